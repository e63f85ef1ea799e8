"""The AUTOMATIC1111 web UI API on the REST gateway (`/sdapi/v1`), for the clients that speak it:
`webuiapi`, SillyTavern, Open WebUI's "Automatic1111" engine, and scripts written against A1111.

    POST /sdapi/v1/txt2img   {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed",
                              "sampler_name", "scheduler", "batch_size", "n_iter", ...}
                          -> {"images": [base64 PNG, ...], "parameters": {...}, "info": "<JSON string>"}
    POST /sdapi/v1/img2img   the same with "init_images" (one), "denoising_strength", and for inpainting "mask"
                             (white = repaint), "inpainting_mask_invert"; to an x4 upscaler deployment the
                             init image comes back 4x, "noise_level" (fastsd's) in place of the strength
    GET  /sdapi/v1/sd-models, /samplers, /schedulers, /loras, /options (POST: sd_model_checkpoint), /progress
         (the running engine call's step and ETA), /scripts, /cmd-flags
    POST /sdapi/v1/interrupt, /skip: every engine call running now stops at its next step (progress.py); an
         interrupted txt2img/img2img answers 200 without images and "interrupted": true in its info

The bodies are translated by a1111_fields.py into request.parse_query's fields and go through the same
client as `/score` (gateway.py). Errors are FastAPI's shape {"detail": "..."}: 422 for a bad value
(naming A1111's field), 401 for the token (Bearer, or basic auth with the token as password), 413, 429,
503, 504.
"""

import functools
import json
import threading
import time

from . import a1111_fields as fields
from .gateway import ApiError, Gateway, png_b64

PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")  # the generation routes, labelled in the gateway's metrics


class Jobs:
    """The A1111 jobs this gateway has in flight, and where the replicas' engine calls are (progress.py)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.lock = threading.Lock()
        self.running: dict[str, dict] = {}  # request id -> {"started", "kind"}

    def start(self, rid: str, kind: str):
        with self.lock:
            self.running[rid] = {"started": time.time(), "kind": kind}

    def end(self, rid: str):
        with self.lock:
            self.running.pop(rid, None)

    def progress(self) -> dict:
        """A1111's /progress: the furthest-along busy replica's step of its steps, and its ETA."""
        with self.lock:
            jobs = sorted(self.running.values(), key=lambda j: j["started"])
        r = self.gw.furthest_progress()
        now = time.time()
        if r is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state(jobs, 0, 0), "current_image": None,
                    "textinfo": None}
        step, steps = r["step"], r["steps"]
        done = step / steps
        elapsed = max(0.0, now - (r["started"] or now))
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return {"progress": round(done, 4), "eta_relative": round(eta, 3), "state": _state(jobs, step, steps),
                "current_image": None, "textinfo": f"step {step} of {steps}"}


def _state(jobs: list, step: int, steps: int) -> dict:
    started = jobs[0]["started"] if jobs else None
    return {"skipped": False, "interrupted": False, "stopping_generation": False,
            "job": jobs[0]["kind"] if jobs else "", "job_count": len(jobs),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)) if started else "0",
            "job_no": 0, "sampling_step": step, "sampling_steps": steps}


def a1111_error(e: ApiError, request_id: str):
    from fastapi.responses import JSONResponse  # lazy: the serving extra; `fastsd` commands never import it
    body = {"detail": e.message, "error": "fastsd", "param": e.param, "request_id": request_id}
    return JSONResponse(body, status_code=e.status, headers={**e.headers, "X-Request-ID": request_id})


def mount(app, gw: Gateway) -> None:
    """The routes, on the REST gateway's FastAPI app."""
    from fastapi import Request  # lazy: the serving extra
    from fastapi.responses import JSONResponse

    jobs = Jobs(gw)
    model = gw.model_id

    def guarded(handler):
        @functools.wraps(handler)
        async def route(request: Request):
            try:
                gw.check_token(request)
                return await handler(request)
            except ApiError as e:
                return a1111_error(e, request.state.request_id)
        return route

    def route(path: str, method: str = "GET"):
        def add(handler):
            app.add_api_route("/sdapi/v1/" + path, guarded(handler), methods=[method])
            return handler
        return add

    async def json_body(request: Request):
        raw = await gw.body(request)
        try:
            return json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(422, f"the body is not JSON: {str(e)[:200]}") from None

    async def generate(request: Request, img2img: bool):
        body = await json_body(request)
        kind = (gw.client.engine() or {}).get("kind") if img2img else None  # the replicas' model kind
        job = fields.translate(body, gw.limits, model, img2img, kind)
        query = gw.query(job.fields, fields.PARAM_NAMES)
        rid = request.state.request_id
        jobs.start(rid, "img2img" if img2img else "txt2img")
        interrupted = None
        try:
            reply = await gw.generate(request, query)
        except ApiError as e:
            if e.status != 409:
                raise
            reply, interrupted = None, e.message  # A1111 answers an interrupted job with 200 too
        finally:
            jobs.end(rid)
        size = reply.images[0].size if reply else (0, 0)
        echoed = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        if img2img:
            echoed.update(init_images=None, mask=None)  # as A1111 answers without include_init_images
        send = body.get("send_images", True) is not False
        images = [png_b64(im) for im in reply.images] if reply and send else []
        info = fields.info(job, body, model, size)
        if interrupted:
            info.update(interrupted=True, fastsd_message=interrupted)
        return JSONResponse({"images": images, "parameters": echoed, "info": json.dumps(info)})

    @route("txt2img", "POST")
    async def txt2img(request: Request):
        return await generate(request, img2img=False)

    @route("img2img", "POST")
    async def img2img(request: Request):
        return await generate(request, img2img=True)

    @route("sd-models")
    async def sd_models(request: Request):
        return JSONResponse([{"title": model, "model_name": model, "hash": None, "sha256": None, "filename": model,
                              "config": None}])

    @route("samplers")
    async def samplers(request: Request):
        return JSONResponse([{"name": name, "aliases": [*aliases, scheduler], "options": {}}
                             for name, (scheduler, aliases) in fields.SAMPLERS.items()])

    @route("schedulers")
    async def schedulers(request: Request):
        return JSONResponse([{"name": name, "label": label, "aliases": None, "default_rho": -1.0,
                              "need_inner_model": False} for name, label in fields.SCHEDULE_TYPES.items()])

    @route("loras")
    async def loras(request: Request):
        catalog = gw.loras()
        return JSONResponse([] if catalog is None else
                            [{"name": n, "alias": n, "path": str(catalog.path(n)), "metadata": {}}
                             for n in catalog.names()])

    @route("options")
    async def options(request: Request):
        return JSONResponse({"sd_model_checkpoint": model, "sd_checkpoint_hash": None, **fields.OPTIONS_FIXED})

    @route("options", "POST")
    async def set_options(request: Request):
        fields.check_options(await json_body(request), model, "options")
        return JSONResponse(None)

    @route("progress")
    async def progress(request: Request):
        return JSONResponse(jobs.progress())

    @route("interrupt", "POST")
    async def interrupt(request: Request):
        gw.interrupt()
        return JSONResponse(None)

    @route("skip", "POST")
    async def skip(request: Request):  # A1111's skip ends the current image of a batch; here: its engine call
        gw.interrupt()
        return JSONResponse(None)

    @route("scripts")
    async def scripts(request: Request):
        return JSONResponse({"txt2img": [], "img2img": []})

    @route("cmd-flags")
    async def cmd_flags(request: Request):
        return JSONResponse({"api": True, "nowebui": True, "ckpt": model,
                             "lora_dir": gw.spec.lora_dir})
