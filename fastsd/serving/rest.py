"""The REST gateway: the model cards' online-endpoint scoring format over HTTP, forwarded to the
deployment through MII's client (MII's own REST gateway answers HTTP 500 for images).

    python -m fastsd.serving.rest DEPLOYMENT_DIR

POST /score
    {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"],
                    "index": [0], "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}
 -> [{"prompt": "...", "generated_image": "<base64 PNG>", "nsfw_content_detected": false}]
GET /health -> {"status": "ok"} (503 when the load balancer does not answer); no token needed.

`data` rows are prompts, or rows with one value per column ("prompt", optionally "negative_prompt").
Azure ML's image-to-image (columns prompt, image) and inpainting (prompt, image, mask_image,
negative_prompt) rows carry base64 images (rows as lists or records); they go to the deployment's
`NAME-inpaint` record (MII's InpaintingReply; no masks for image-to-image). Image URLs are refused (422).
Errors are JSON {"error": "...", ...}: 400 body not JSON or not the format, 401 token missing or
wrong, 413 body too large, 422 a value out of range (the engine's validation, through the replica),
429 server busy, 503 the load balancer does not answer, 504 timeout (also when no replica is up: the balancer
waits for one until the request times out).

MII's client binds to the event loop it was made in, and FastAPI runs sync endpoints in a thread
pool: each worker thread gets its own event loop and its own `mii_query_handle`.
"""

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import TOKEN_ENV, graceful_signals, port_answers, read_json, use_cache_path, watch_parent

log = logging.getLogger("fastsd.serving.rest")
PARAMS = ("num_inference_steps", "guidance_scale", "height", "width", "seed", "scheduler", "num_images_per_prompt",
          "negative_prompt", "strength")
IMAGE_COLUMNS = ("image", "mask_image")  # Azure ML's inpainting and image-to-image formats: base64 images


class BadRequest(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def parse_score_body(body: bytes, with_images: bool = False):
    """The model-card request -> (prompts, negative prompts or None, query kwargs). Raises BadRequest.
    with_images: also Azure ML's image-to-image (columns prompt, image) and inpainting (prompt, image,
    mask_image[, negative_prompt]) rows, base64 images; returns a fourth item {"image": [bytes, ...],
    "mask_image": [...]} (empty lists for text-to-image). Image URLs are refused: a server that fetches
    URLs on request can be sent to internal addresses (SSRF)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("input_data"), dict):
        raise BadRequest(400, 'expected {"input_data": {"columns": ["prompt"], "data": [...], "parameters": {...}}}')
    inp = doc["input_data"]
    columns = inp.get("columns", ["prompt"])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise BadRequest(400, "input_data.columns: expected a list of column names")
    if "prompt" not in columns:
        raise BadRequest(400, 'input_data.columns: a "prompt" column is required', parameter="prompt")
    allowed = ("prompt", "negative_prompt") + (IMAGE_COLUMNS if with_images else ())
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise BadRequest(400, f"input_data.columns: unknown column {unknown[0]!r}; allowed: {', '.join(allowed)}")
    if "mask_image" in columns and "image" not in columns:
        raise BadRequest(422, "mask_image: a mask only together with an image column", parameter="mask_image")
    images = {c: [] for c in IMAGE_COLUMNS}
    data = inp.get("data")
    if not isinstance(data, list) or not data:
        raise BadRequest(400, "input_data.data: expected a non-empty list of prompts", parameter="prompt")
    p_i = columns.index("prompt")
    n_i = columns.index("negative_prompt") if "negative_prompt" in columns else None
    prompts, negatives = [], []
    for row in data:
        if isinstance(row, dict):  # Azure ML's records form: {"prompt": ..., "image": ...}
            missing = [c for c in columns if c not in row and c != "negative_prompt"]
            if missing:
                raise BadRequest(400, f"input_data.data: row {row!r:.60} has no {missing[0]!r}")
            row = [row.get(c, "") for c in columns]
        if not isinstance(row, list) and len(columns) == 1:
            row = [row]
        if not isinstance(row, list) or len(row) != len(columns):
            raise BadRequest(400, f"input_data.data: each row must be a prompt or a list of {len(columns)} "
                                  f"values ({', '.join(columns)}); got {row!r:.80}")
        if not isinstance(row[p_i], str) or not row[p_i].strip():
            raise BadRequest(422, f"prompt: got {row[p_i]!r:.80}; allowed: non-empty text", parameter="prompt")
        prompts.append(row[p_i])
        if n_i is not None:
            if not isinstance(row[n_i], str):
                raise BadRequest(422, f"negative_prompt: got {row[n_i]!r:.80}; allowed: text",
                                 parameter="negative_prompt")
            negatives.append(row[n_i])
        for c in IMAGE_COLUMNS:
            if c in columns:
                images[c].append(_image_bytes(c, row[columns.index(c)]))
    params = inp.get("parameters", doc.get("parameters", {})) or {}
    if not isinstance(params, dict):
        raise BadRequest(400, "input_data.parameters: expected an object")
    kwargs = {}
    for k, v in params.items():
        if k not in PARAMS:
            raise BadRequest(422, f"{k}: unknown parameter; allowed: {', '.join(PARAMS)}", parameter=k)
        if k == "negative_prompt":
            if n_i is not None:
                raise BadRequest(400, "negative_prompt: give it as a column or as a parameter, not both")
            if not isinstance(v, str):
                raise BadRequest(422, f"negative_prompt: got {v!r:.80}; allowed: text", parameter=k)
            negatives = [v] * len(prompts)
            continue
        if v is None or not isinstance(v, (str, int, float, bool)):  # what MII's Value carries
            raise BadRequest(422, f"{k}: got {v!r:.80}; allowed: a number" + (" or text" if k == "scheduler" else ""),
                             parameter=k)
        kwargs[k] = v
    if with_images:
        return prompts, negatives or None, kwargs, images
    return prompts, negatives or None, kwargs


def _image_bytes(column: str, value) -> bytes:
    """A base64 image cell -> its bytes (decoded as an image, under the limits, by the replica)."""
    import binascii
    if isinstance(value, str) and value.strip().lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise BadRequest(422, f"{column}: got a URL; allowed: a base64-encoded PNG, JPEG or WebP image (this "
                              "server does not fetch URLs: a server that fetches them on request can be sent to "
                              "internal addresses)", parameter=column)
    if not isinstance(value, str) or not value:
        raise BadRequest(422, f"{column}: got {type(value).__name__}; allowed: a base64-encoded PNG, JPEG or WebP "
                              "image", parameter=column)
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f"{column}: got text that is not base64; allowed: a base64-encoded PNG, JPEG or "
                              "WebP image", parameter=column) from None


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def create_app(name: str, spec: dict, token: str | None):
    import grpc
    import mii
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    timeout = float(spec["limits"]["timeout"]) + 5
    max_body = int(spec.get("max_body_bytes", 1 << 20))
    local = threading.local()
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="mii-client")  # one MII handle each
    app = FastAPI(title=f"fastsd deployment {name}", docs_url=None, redoc_url=None, openapi_url=None)
    status_for = {grpc.StatusCode.INVALID_ARGUMENT: 422, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
                  grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                  grpc.StatusCode.UNIMPLEMENTED: 501}

    def client(inpaint: bool = False):
        if getattr(local, "client", None) is None:
            local.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(local.loop)
            local.client = mii.legacy.mii_query_handle(name)
        if inpaint and getattr(local, "inpaint_client", None) is None:
            local.inpaint_client = mii.legacy.mii_query_handle(name + "-inpaint")  # InpaintingReply
        return local.inpaint_client if inpaint else local.client

    def error(status: int, message: str, **extra):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if not token:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    @app.get("/health")
    def health():
        ok = port_answers(spec["port"], spec["host"], 0.5)
        return JSONResponse({"status": "ok" if ok else "unavailable", "deployment": name},
                            status_code=200 if ok else 503)

    @app.post("/score")
    async def score(request: Request):
        if not authorised(request):
            return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return error(413, f"the body is larger than {max_body} bytes", limit=max_body)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return error(413, f"the body is larger than {max_body} bytes", limit=max_body)
        try:
            prompts, negatives, kwargs, images = parse_score_body(bytes(body), with_images=True)
        except BadRequest as e:
            return error(e.status, e.message, **e.extra)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, run_query, prompts, negatives, kwargs, images)

    def run_query(prompts, negatives, kwargs, images=None):
        with_image = bool(images and images["image"])
        c = client(inpaint=with_image)
        request = {"prompt": prompts, "negative_prompt": negatives or [""] * len(prompts)}
        if with_image:  # image-to-image is InpaintingReply without masks
            request.update(image=images["image"], mask_image=images["mask_image"])
        try:
            reply = local.loop.run_until_complete(asyncio.wait_for(c._request_async_response(request, **kwargs),
                                                                   timeout))
        except grpc.aio.AioRpcError as e:
            details = e.details() or e.code().name
            param = details.split(":", 1)[0] if e.code() == grpc.StatusCode.INVALID_ARGUMENT else None
            return error(status_for.get(e.code(), 500), details, **({"parameter": param} if param else {}))
        except asyncio.TimeoutError:
            return error(504, f"no reply within {timeout:g} s")
        n_img = len(reply.images) // max(1, len(prompts))
        return JSONResponse([{"prompt": prompts[i // max(1, n_img)], "generated_image": png_b64(img),
                              "nsfw_content_detected": bool(flag)}
                             for i, (img, flag) in enumerate(zip(reply.images, reply.nsfw_content_detected))])

    return app


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rest %(levelname)s %(message)s")
    spec = read_json(ddir / "spec.json")
    os.environ["MII_CACHE_PATH"] = str(ddir.parent)
    use_cache_path()
    import uvicorn
    token = os.environ.get(TOKEN_ENV) or None
    app = create_app(spec["name"], spec, token)
    config = uvicorn.Config(app, host=spec["host"], port=int(spec["rest_port"]), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop():
        server.should_exit = True
    watch_parent(stop)
    graceful_signals(stop)
    log.info("REST gateway on http://%s:%d (token %s)", spec["host"], spec["rest_port"],
             "required" if token else "not required")
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
