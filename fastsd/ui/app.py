"""The web page: a Gradio app whose every request goes to a running deployment through MII's client
(fastsd.serving.client), so the page is one more client of the server and draws nothing itself.

The generate action is also Gradio's API endpoint `/generate`; its inputs are named after the parameters
of `generate` below (prompt, negative_prompt, steps, guidance, seed, width, height, scheduler, num_images,
image, mask_image, strength, lora, lora_scale, noise_level, mask_paint); `/cancel` stops the caller's requests
(jobs.py), and while one runs Gradio's progress shows "step i of n":

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict(prompt="a red circle", steps=25, seed=0, api_name="/generate")

An uploaded image makes the request image-to-image, with a mask too (white = repaint) inpainting: a mask painted
over the image in the page's editor (masks.py) or an uploaded one; both go
to the deployment's inpainting record through MII's InpaintingReply. A deployment of a depth model takes the
image (and strength) as depth-to-image, its depth from the model's own estimator; one of the x4 upscaler takes
the image and `noise_level` (not strength) and answers 4x the image's size (the page asks the deployment
which kind its model is). The LoRA picker lists the adapters
in the deployment's --lora-dir (read when the page opens) and sends `lora="name:scale"`.

Errors from the server (a value it refuses, a timeout, no replica up) come back as `gr.Error`: a readable
message on the page (and an error for API callers), never a stack trace; the page goes on working.

The form's components are listed once (`inputs` in build_app), in the order of `generate`'s parameters, and
every value reaches the deployment as a query keyword: image-to-image, inpainting and LoRA add a component
there, a keyword parameter to `generate` and its keyword in the request, not a second page.
"""
import logging
import os
import random
import tempfile
import time
from pathlib import Path

from ..errors import InvalidParameter
from ..images import encode_png, read_file
from ..serving.client import DeploymentClient, running_spec
from ..serving.errors import DeploymentError, ServingError, plain_message
from ..serving.folders import cache_path
from ..serving.loras import LoraCatalog
from ..serving.ports import LOOPBACK, port_free
from ..serving.schema import SCHEDULERS
from .jobs import Jobs, run as run_job
from .masks import painted_mask

log = logging.getLogger("fastsd.ui")
MODEL_DEFAULT = "the model's"
NO_LORA = "none"
MAX_SEED = 2**31 - 1
TITLE = "fastsd"
# What the user reads for each kind of server error; the server's own reason follows.
ERROR_KINDS = {
    "INVALID_ARGUMENT": "The deployment refused a value",
    "DEADLINE_EXCEEDED": "The deployment did not answer in time",
    "UNAVAILABLE": "The deployment is not reachable (is a replica up?)",
    "RESOURCE_EXHAUSTED": "The deployment is busy",
    "UNIMPLEMENTED": "The deployment cannot do that",
}


def friendly(e: Exception) -> str:
    """One readable line for the page."""
    if isinstance(e, DeploymentError):  # plain: no gRPC text or addresses on the page
        return f"{ERROR_KINDS.get(e.code, 'The deployment failed')}: {plain_message(e)}"
    if isinstance(e, (ServingError, InvalidParameter)):
        return str(e)
    return f"Unexpected error ({type(e).__name__}): {e}"


def _int_or_none(value, zero_is_none: bool = False):
    if value is None or (zero_is_none and value == 0):
        return None
    return int(value) if float(value).is_integer() else value  # a fraction goes to the server, which names it


def _prune(out_dir: Path, age: float = 3600.0) -> None:
    """The page's PNGs live an hour (Gradio serves its own copies; delete_cache prunes those)."""
    import shutil
    cutoff = time.time() - age
    for d in out_dir.glob("req-*"):
        try:
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def describe(client: DeploymentClient) -> str:
    """The engine the deployment runs, in one line (read now: a page may open before a replica says)."""
    e, spec = client.engine(), client.spec
    if not e:
        return f"{spec.model} (deployment {client.name})"
    return (f"{e.get('model', spec.model)}, {e.get('dtype')}, {e.get('backend')} on {e.get('device')}, "
            f"attention {e.get('attention')} (deployment {client.name}, {len(spec.replicas)} replica(s))")


def lora_names(client: DeploymentClient) -> list[str]:
    """The adapter names a request's `lora` keyword may use (read now: files added later are offered)."""
    if not client.spec.lora_dir:
        return []
    try:
        return LoraCatalog(client.spec.lora_dir).names()
    except InvalidParameter:  # the folder went away since `fastsd serve`
        return []


def _header(client: DeploymentClient) -> str:
    return f"## {TITLE} · deployment `{client.name}`\n{describe(client)}"


def _png(image, name: str, mode: str) -> bytes:
    """An image from the page (PIL, or a file path from an API caller) -> PNG bytes for the request."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        return encode_png(read_file(image, name, mode=mode))
    if isinstance(image, dict) and image.get("path"):  # a FileData dict
        return encode_png(read_file(image["path"], name, mode=mode))
    if isinstance(image, Image.Image):
        return encode_png(image.convert(mode))
    raise InvalidParameter(name, type(image).__name__, "an uploaded PNG, JPEG or WebP image")


def lora_value(lora, scale) -> str | None:
    """The picker's choice -> the request's `lora` keyword (NAME:SCALE), None for no adapter."""
    if lora in (None, "", NO_LORA):
        return None
    return f"{lora}:{float(1.0 if scale is None else scale):g}"


def task_label(image, mask_image, strength, kind: str | None = None, noise_level=None) -> str:
    """What the page says it did: the task (the model's kind for a depth or upscaler model), and the strength
    or noise level where an image was uploaded."""
    if image is None:
        return "text-to-image"
    task = {"depth": "depth-to-image", "upscale": "x4 upscale"}.get(kind) or \
        ("image-to-image" if mask_image is None else "inpainting")
    return f"{task} ({f'noise level {noise_level}' if noise_level is not None else f'strength {float(strength):g}'})"


def scheduler_choices(client: DeploymentClient) -> list[tuple[str, str]]:
    """The dropdown's (label, value) pairs: the model's own scheduler (named once a replica says which), then
    every scheduler fastsd has (fastsd.schedulers, as the request schema lists them)."""
    own = (client.engine() or {}).get("scheduler")
    return [(f"{MODEL_DEFAULT} ({own})" if own else MODEL_DEFAULT, MODEL_DEFAULT), *((s, s) for s in SCHEDULERS)]


def session_of(request) -> str:
    """The page (browser tab, or gradio_client) a request comes from: Cancel stops that page's requests."""
    return getattr(request, "session_hash", None) or "-"


def _stopped(seen, steps) -> str:
    where = f"at step {seen[0]} of {seen[1]}" if seen else f"before its first step (of {steps})"
    return f"**cancelled** {where}: the deployment stops the request at its next step; nothing was made"


def make_generate(client: DeploymentClient, out_dir: Path, jobs: Jobs | None = None):
    """The function behind the button and the /generate endpoint (its parameter names are the API's)."""
    import gradio as gr
    jobs = jobs or Jobs()
    folder = cache_path() / client.name

    def generate(prompt: str, negative_prompt: str = "", steps: int = 25, guidance: float = 7.5, seed: int = -1,
                 width: int = 0, height: int = 0, scheduler: str = MODEL_DEFAULT, num_images: int = 1,
                 image=None, mask_image=None, strength: float = 0.8, lora: str = NO_LORA, lora_scale: float = 1.0,
                 noise_level: int = 20, mask_paint=None, request: gr.Request = None, progress=gr.Progress()):
        session = session_of(request)
        cancel = jobs.start(session)
        try:
            if seed is None or seed < 0:
                seed = random.randrange(MAX_SEED)  # drawn here, so the page can say which seed it used
            n = _int_or_none(num_images) or 1
            if image is None and isinstance(mask_paint, dict):  # the start image uploaded into the editor itself
                image = mask_paint.get("background")
            painted = painted_mask(mask_paint, getattr(image, "size", None))
            if painted is not None and mask_image is not None:
                raise InvalidParameter("mask_paint", "a painted mask and an uploaded mask_image",
                                       "one of them (clear the painting, or remove the uploaded mask)")
            mask_image = painted if painted is not None else mask_image
            if mask_image is not None and image is None:
                raise InvalidParameter("mask_image", "a mask", "a mask only together with an image (upload one)")
            images, kind = {}, (client.engine() or {}).get("kind")
            if image is not None and kind == "upscale":  # the x4 upscaler: a noise level, no strength
                images = {"image": [_png(image, "image", "RGB")], "noise_level": _int_or_none(noise_level)}
            elif image is not None:  # image-to-image, with a mask inpainting; depth-to-image for a depth model
                images = {"image": [_png(image, "image", "RGB")], "strength": float(strength)}
                if mask_image is not None:
                    images["mask_image"] = [_png(mask_image, "mask_image", "L")]
            query = dict(num_inference_steps=_int_or_none(steps), guidance_scale=float(guidance),
                         seed=_int_or_none(seed), width=_int_or_none(width, True), height=_int_or_none(height, True),
                         scheduler=None if scheduler in (None, "", MODEL_DEFAULT) else scheduler,
                         num_images_per_prompt=n if n != 1 else None, lora=lora_value(lora, lora_scale), **images)
            seen: list[int] = []  # the last (step, steps) the deployment reported

            def on_step(i: int, of: int) -> None:
                seen[:] = [i, of]
                progress((i, of), desc=f"step {i} of {of}", unit="steps")
            t0 = time.perf_counter()
            try:
                reply = run_job(lambda stop: client.generate([prompt or ""], [negative_prompt or ""], cancel=stop,
                                                             **query),
                                cancel, folder, len(client.spec.replicas), on_step)
            except DeploymentError as e:
                if e.code != "CANCELLED" or not cancel.is_set():
                    raise
                return gr.skip(), _stopped(seen, steps), gr.skip()
            elapsed = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            if not isinstance(e, (DeploymentError, ServingError, InvalidParameter)):
                log.exception("generate failed")
            raise gr.Error(friendly(e), duration=None, print_exception=False) from None
        finally:
            jobs.end(session, cancel)
        seeds = [int(seed) + i for i in range(len(reply.images))]
        _prune(out_dir)
        request_dir = Path(tempfile.mkdtemp(prefix="req-", dir=out_dir))
        paths = []
        for s, out in zip(seeds, reply.images):  # `image` stays the upload: it names the task below
            path = request_dir / f"fastsd-seed{s}.png"
            out.save(path)
            paths.append(str(path))
        if painted is not None:  # the painted mask as sent, so `fastsd generate --mask` can repeat the request
            painted.save(request_dir / "mask.png")
            paths.append(str(request_dir / "mask.png"))
        flagged = sum(bool(f) for f in reply.nsfw_content_detected)
        w, h = reply.images[0].size if reply.images else (0, 0)
        info = (f"**seed {seeds[0]}**" + (f" to {seeds[-1]}" if len(seeds) > 1 else "")
                + f" · {task_label(image, mask_image, strength, kind, images.get('noise_level'))}"
                + (f" · LoRA {lora_value(lora, lora_scale)}" if lora_value(lora, lora_scale) else "")
                + (f" · {seen[1]} of {seen[1]} steps" if seen else "")
                + (" · painted mask" if painted is not None else "")
                + f" · {len(seeds)} image(s) {w}x{h} in {elapsed:.2f} s · "
                + describe(client)
                + (f" · {flagged} flagged by the safety checker (black)" if flagged else ""))
        gallery = [(p, f"seed {s}") for p, s in zip(paths, seeds)]  # the images, not the mask
        return gallery, info, paths

    return generate


def build_app(client: DeploymentClient, out_dir: Path | None = None):
    import gradio as gr
    limits = client.spec.limits
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fastsd-ui-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = Jobs()
    generate = make_generate(client, out_dir, jobs)
    with gr.Blocks(title=f"{TITLE}: {client.name}", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        header = gr.Markdown(_header(client), elem_id="engine")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", lines=2, placeholder="a red circle on a blue background",
                                    elem_id="prompt")
                negative = gr.Textbox(value="", label="negative prompt", lines=1, elem_id="negative_prompt")
                steps = gr.Slider(1, limits.max_steps, value=25, step=1, label="steps",
                                  elem_id="steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="seed (-1: random)", elem_id="seed")
                    random_seed = gr.Button("random seed", size="sm", elem_id="random_seed")
                with gr.Row():
                    width = gr.Number(value=0, precision=0, label="width (0: the model's)", elem_id="width")
                    height = gr.Number(value=0, precision=0, label="height (0: the model's)", elem_id="height")
                scheduler = gr.Dropdown(scheduler_choices(client), value=MODEL_DEFAULT, label="scheduler",
                                        elem_id="scheduler")
                num_images = gr.Slider(1, max(1, min(8, limits.max_images)), value=1, step=1,
                                       label="number of images", elem_id="num_images")
                with gr.Accordion("image-to-image and inpainting", open=False, elem_id="image_inputs"):
                    with gr.Row():
                        image = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                         label="start image (image-to-image)", elem_id="image")
                        mask_image = gr.Image(type="pil", image_mode="L", sources=["upload", "clipboard"],
                                              label="or upload a mask, the image's size (white = repaint)",
                                              elem_id="mask_image")
                    # the start image again, to paint the region to repaint over it (inpainting)
                    mask_paint = gr.ImageEditor(type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                                label="inpainting: paint over the start image where to repaint",
                                                elem_id="mask_paint", format="png", transforms=[], layers=False,
                                                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                                canvas_size=(512, 512))
                    strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="strength (how much is repainted)",
                                         elem_id="strength")
                    noise_level = gr.Slider(0, 350, value=20, step=1, elem_id="noise_level",
                                            label="noise level (an x4 upscaler deployment: noise added to the image)")
                loras = lora_names(client)
                with gr.Row():
                    lora = gr.Dropdown([NO_LORA, *loras], value=NO_LORA, label="LoRA (the deployment's --lora-dir)",
                                       elem_id="lora", allow_custom_value=True)
                    lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA weight", elem_id="lora_scale")
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="images", format="png", columns=2, elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                result = gr.Markdown(elem_id="result")
                files = gr.File(label="PNG downloads", file_count="multiple", elem_id="files")
        # read again when a page opens: a page started with its deployment may be up before the replicas say
        # which engine they run
        demo.load(lambda: _header(client), None, header, api_name=False, queue=False)
        demo.load(lambda: gr.Dropdown(choices=scheduler_choices(client)), None, scheduler, api_name=False, queue=False)
        # the adapters the deployment offers now (files added to --lora-dir since the page started included)
        demo.load(lambda: gr.Dropdown(choices=[NO_LORA, *lora_names(client)]), None, lora, api_name=False,
                  queue=False)
        random_seed.click(lambda: -1, None, seed, api_name=False, queue=False)
        # the start image is the editor's background: a new one clears what was painted over the old one
        image.change(lambda im: None if im is None else {"background": im, "layers": [], "composite": im}, image,
                     mask_paint, api_name=False, queue=False)
        inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler, num_images, image, mask_image,
                  strength, lora, lora_scale, noise_level, mask_paint]
        button.click(generate, inputs, [gallery, result, files], api_name="generate")
        prompt.submit(generate, inputs, [gallery, result, files], api_name=False)
        # stops this page's requests (not other users'): the deployment ends the engine call at its next step
        def cancel(request: gr.Request = None) -> None:
            jobs.cancel(session_of(request))
        stop.click(cancel, None, None, api_name="cancel", queue=False)
    return demo


def check_exposure(host: str, token: str | None, name: str) -> None:
    """The page runs the deployment for whoever reaches it: off loopback only behind a token, and a
    deployment that requires a token gets a page that asks for it."""
    if token is None and running_spec(name).token_required:
        raise InvalidParameter("token", None, f"the token of deployment '{name}', which requires one "
                                              "(--token or $FASTSD_TOKEN)")
    if token is None and host not in LOOPBACK:
        raise InvalidParameter("host", host, "127.0.0.1, localhost or ::1 unless a token is set (--token or "
                                             "$FASTSD_TOKEN): without one, anyone who reaches the page runs the "
                                             "deployment")


def launch(name: str, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
           concurrency: int | None = None, block: bool = True):
    """Serves the page; returns (demo, url). With block=False it returns once the page answers."""
    import hmac
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_exposure(host, token, name)
    if not 1 <= port <= 65535 or not port_free(port, host):
        raise InvalidParameter("port", port, "a free TCP port")
    client = DeploymentClient(name)
    concurrency = concurrency or len(client.spec.replicas) * client.spec.max_images_per_call
    demo = build_app(client)
    # up to `concurrency` requests in flight, so the deployment's dynamic batching can merge them; the
    # rest wait in Gradio's queue, and the page shows their position
    demo.queue(default_concurrency_limit=concurrency)

    def auth(_user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), token.encode())
    import gradio as gr
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    _, url, _ = demo.launch(server_name=host, server_port=port, auth=auth if token else None,
                            auth_message=f"deployment {name}: any user name, the deployment's token as password"
                            if token else None, prevent_thread_lock=not block, quiet=True, ssr_mode=False,
                            footer_links=["api"], theme=theme, max_threads=max(40, concurrency + 8))
    return demo, url
