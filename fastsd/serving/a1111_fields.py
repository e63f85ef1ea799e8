"""AUTOMATIC1111's `/sdapi/v1` request bodies in fastsd's terms, and the `info` an answer carries back.

- Samplers by A1111's names (and aliases), each mapped to the fastsd scheduler that is the same method
  (diffusers' class of that name); A1111's `scheduler` (the noise schedule) is "automatic" only.
- `<lora:NAME:WEIGHT>` in the prompt names an adapter of the deployment's --lora-dir (A1111's
  convention); the tag is removed from the text the encoder sees.
- Seeds: -1 (or none) draws one here; `batch_size` x `n_iter` images take seed, seed+1, ...
- What fastsd cannot do is refused when it would change the image wholesale (hires fix, face restoration,
  tiling, styles, scripts) and otherwise accepted, ignored and listed in info's `fastsd_ignored` (mask
  blur, "only masked" inpainting, fills other than "original", sampler knobs), so nothing is silently
  wrong. Unknown fields are ignored, as A1111 does.
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

from ..errors import InvalidParameter
from ..images import decode_base64, encode_png
from .gateway import ApiError
from .request import DEFAULT_STEPS, Limits

# A1111's sampler name -> (fastsd scheduler, A1111's aliases)
SAMPLERS = {
    "Euler a": ("euler-ancestral", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "LMS": ("lms", ["k_lms"]),
    "DPM++ 2M": ("dpm++", ["k_dpmpp_2m"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", []),
}
DEFAULT_SAMPLER = "Euler"  # A1111's API default (sampler_index "Euler")
SCHEDULE_TYPES = {"automatic": "Automatic"}
DEFAULT_CFG = 7.0
DEFAULT_STRENGTH = 0.75
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
# fastsd's field names in errors -> A1111's
PARAM_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size",
               "strength": "denoising_strength", "image": "init_images", "mask_image": "mask",
               "height x width": "width x height"}
# refused unless neutral: fastsd cannot do them and the image would be another one altogether
REFUSED = {"enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
           "styles": ([], None), "script_name": (None, ""), "script_args": ([], None)}
# accepted and ignored unless neutral; then named in info["fastsd_ignored"]
IGNORED = {"subseed_strength": (0, 0.0, None), "s_churn": (0, 0.0, None),
           "s_tmax": (0, 0.0, None), "s_tmin": (0, 0.0, None), "s_noise": (1, 1.0, None),
           "save_images": (False, None), "mask_blur": (0, None), "inpainting_fill": (1, None),
           "inpaint_full_res": (False, 0, None), "initial_noise_multiplier": (1, 1.0, None)}
# image_cfg_scale concerns instruct-pix2pix models only, which A1111 too ignores it for elsewhere
# eta: the DDIM sampler runs with 0 and the ancestral one with 1 (A1111's defaults); other samplers have none
ETA = {"ddim": 0, "euler-ancestral": 1}
OPTIONS_FIXED = {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "samples_format": "png"}


def sampler(name) -> tuple[str, str]:
    """An A1111 sampler name or alias (or a fastsd scheduler name) -> (A1111's name, fastsd's scheduler)."""
    if isinstance(name, str):
        for a1111, (fastsd, aliases) in SAMPLERS.items():
            if name.lower() in (a1111.lower(), fastsd, *aliases):
                return a1111, fastsd
    raise ApiError(422, f"sampler_name: got {name!r}; allowed: {', '.join(SAMPLERS)} (GET /sdapi/v1/samplers)",
                   "sampler_name")


def schedule_type(name) -> str:
    if name is None or (isinstance(name, str) and name.lower() in SCHEDULE_TYPES):
        return SCHEDULE_TYPES["automatic"]
    raise ApiError(422, f"scheduler: got {name!r}; allowed: {', '.join(SCHEDULE_TYPES.values())} "
                        "(fastsd's samplers use the model's own noise schedule; GET /sdapi/v1/schedulers)", "scheduler")


def loras_in(prompt) -> tuple[str, str | None]:
    """A prompt -> (the prompt without its <lora:NAME:WEIGHT> tags, fastsd's `lora` value or None)."""
    if not isinstance(prompt, str):
        return prompt, None
    tags = [f"{m.group(1).strip()}:{(m.group(2) or '1').strip()}" for m in LORA_TAG.finditer(prompt)]
    return LORA_TAG.sub("", prompt), ",".join(tags) or None


def check_options(options, model: str, where: str) -> None:
    """`override_settings` or a POST /options body: only what this deployment already is."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ApiError(422, f"{where}: expected an object of options", where)
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            if value != model:
                raise ApiError(422, f"{where}.sd_model_checkpoint: got {value!r}; allowed: {model!r}, the one model "
                                    "this deployment serves (GET /sdapi/v1/sd-models)", "sd_model_checkpoint")
        elif key not in OPTIONS_FIXED or OPTIONS_FIXED[key] != value:
            allowed = ", ".join(f"{k}={v!r}" for k, v in {"sd_model_checkpoint": model, **OPTIONS_FIXED}.items())
            raise ApiError(422, f"{where}.{key}: got {value!r}; fastsd cannot change it (allowed: {allowed})", key)


def _int(body: dict, name: str, default: int, lo: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ApiError(422, f"{name}: got {v!r}; allowed: an integer >= {lo}", name)
    return v


@dataclass
class Job:
    """One A1111 request in fastsd's terms: parse_query's fields and what its `info` reports."""
    fields: dict
    sampler_name: str
    schedule: str
    seed: int
    steps: int
    cfg_scale: float
    n_images: int
    ignored: dict = field(default_factory=dict)
    denoising_strength: float | None = None


def translate(body, limits: Limits, model: str, img2img: bool, kind: str | None = None) -> Job:
    """A txt2img or img2img body -> the Job. Values are checked here where A1111's meaning differs from
    fastsd's (seeds, samplers, counts); every other check is parse_query's, named with A1111's fields.
    `kind`: the deployment's model kind (fastsd.model_kinds; None when no replica has said yet). An x4
    upscaler's img2img is init image -> 4x image: no denoising strength and no resize (A1111's clients send
    both by default, so they are listed in info's fastsd_ignored, not refused); `noise_level` (not an A1111
    field) is passed on."""
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    for name, neutral in REFUSED.items():
        if body.get(name, neutral[0]) not in neutral:
            raise ApiError(422, f"{name}: got {body[name]!r}; fastsd cannot do it (allowed: {neutral[0]!r})", name)
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise ApiError(422, "alwayson_scripts: expected an object", "alwayson_scripts")
    for name, script in scripts.items():
        args = script.get("args", []) if isinstance(script, dict) else script
        if not (isinstance(args, list) and (not args or args[0] is False)):
            raise ApiError(422, f"alwayson_scripts.{name}: fastsd runs no scripts (only disabled ones are accepted)",
                           "alwayson_scripts")
    check_options(body.get("override_settings"), model, "override_settings")
    ignored = {k: body[k] for k, neutral in IGNORED.items()
               if k in body and body[k] not in neutral and (img2img or k not in ("mask_blur", "inpainting_fill",
                                                                              "inpaint_full_res"))}
    if img2img and body.get("mask") is None:
        for k in ("mask_blur", "inpainting_fill", "inpaint_full_res"):
            ignored.pop(k, None)  # they only concern inpainting
    name = body.get("sampler_name") or body.get("sampler_index") or DEFAULT_SAMPLER
    a1111_name, scheduler = sampler(name)
    schedule = schedule_type(body.get("scheduler"))
    if scheduler in ETA and body.get("eta") not in (None, ETA[scheduler]):
        ignored["eta"] = body["eta"]
    n = _int(body, "batch_size", 1, 1) * _int(body, "n_iter", 1, 1)
    seed = body.get("seed", -1)
    if seed is None or seed == -1:
        seed = random.randrange(2**31)  # drawn here so `info` can say which seed each image had
    steps = body.get("steps")
    steps = min(DEFAULT_STEPS, limits.max_steps) if steps is None else steps
    cfg = body.get("cfg_scale")
    cfg = DEFAULT_CFG if cfg is None else cfg
    prompt, lora = loras_in(body.get("prompt"))
    params = {"num_inference_steps": steps, "guidance_scale": cfg, "seed": seed, "scheduler": scheduler}
    for k in ("width", "height"):
        if body.get(k) is not None:
            params[k] = body[k]
    if n != 1:
        params["num_images_per_prompt"] = n
    if lora:
        params["lora"] = lora
    negative = body.get("negative_prompt")
    fields = {"prompt": prompt, "negative_prompt": None if negative is None else [negative], "parameters": params}
    job = Job(fields, a1111_name, schedule, seed, steps, cfg, n, ignored)
    if img2img and body.get("noise_level") is not None:
        params["noise_level"] = body["noise_level"]  # an upscaler's; the replica refuses it to any other model
    if img2img and kind == "upscale":
        if body.get("denoising_strength") is not None:
            ignored["denoising_strength"] = body["denoising_strength"]
        _upscaler_image(body, params, fields, limits, ignored)
    elif img2img:
        strength = body.get("denoising_strength")
        job.denoising_strength = params["strength"] = DEFAULT_STRENGTH if strength is None else strength
        _images(body, params, fields, limits)
    return job


def _upscaler_image(body: dict, params: dict, fields: dict, limits: Limits, ignored: dict) -> None:
    """An x4 upscaler's init image, as it is: the output is 4x its size. width/height other than that are
    ignored (and listed); a mask is refused."""
    if body.get("mask") is not None:
        raise ApiError(422, "mask: got a mask; allowed: none (this deployment runs the x4 upscaler)", "mask")
    image = _decoded(body, "init_images", limits)
    for k, side in (("width", image.width), ("height", image.height)):
        if params.get(k) is not None and params.pop(k) != 4 * side:
            ignored[k] = body[k]
    fields["image"] = [encode_png(image)]


def _images(body: dict, params: dict, fields: dict, limits: Limits) -> None:
    """init_images (one) and the optional mask -> PNG bytes, resized to width x height when those differ
    (A1111's resize_mode 0, "just resize"); inpainting_mask_invert honoured."""
    image = _decoded(body, "init_images", limits)
    mask = None if body.get("mask") is None else _decoded(body, "mask", limits, mode="L")
    size = (params.get("width", image.width), params.get("height", image.height))
    if image.size != size:
        if body.get("resize_mode", 0) not in (0, None):
            raise ApiError(422, f"resize_mode: got {body['resize_mode']!r}; allowed: 0 (just resize), or an image "
                                "of the size asked for", "resize_mode")
        from PIL import Image
        image = image.resize(size, Image.LANCZOS)
        mask = mask.resize(size, Image.LANCZOS) if mask is not None else None
    elif mask is not None and mask.size != size:
        raise ApiError(422, f"mask: got {mask.width}x{mask.height}; allowed: the init image's size "
                            f"{size[0]}x{size[1]}", "mask")
    if mask is not None and body.get("inpainting_mask_invert") in (1, True):
        mask = mask.point(lambda v: 255 - v)
    fields["image"] = [encode_png(image)]
    if mask is not None:
        fields["mask_image"] = [encode_png(mask)]


def _decoded(body: dict, name: str, limits: Limits, mode: str = "RGB"):
    """`init_images` (a list of one base64 image) or `mask` (one base64 image), decoded under the limits."""
    value = body.get(name)
    if name == "init_images":
        if not isinstance(value, list) or len(value) != 1:
            raise ApiError(422, f"init_images: got {_count(value)}; allowed: a list of one base64 image", name)
        value = value[0]
    try:
        return decode_base64(value, name, mode=mode, max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
    except InvalidParameter as e:
        raise ApiError(422, str(e), e.name) from None


def _count(images) -> str:
    return f"{len(images)} images" if isinstance(images, list) else repr(images)[:40]


def info(job: Job, body: dict, model: str, size: tuple[int, int]) -> dict:
    """What A1111's `info` (a JSON string in the answer) says about the images made."""
    prompt, negative = body.get("prompt", ""), body.get("negative_prompt") or ""
    seeds = [job.seed + i for i in range(job.n_images)]
    w, h = size
    extra = f", Denoising strength: {job.denoising_strength:g}" if job.denoising_strength is not None else ""
    lora = job.fields["parameters"].get("lora")
    extra += f", Lora: {lora}" if lora else ""

    def infotext(seed):
        neg = f"\nNegative prompt: {negative}" if negative else ""
        return (f"{prompt}{neg}\nSteps: {job.steps}, Sampler: {job.sampler_name}, Schedule type: {job.schedule}, "
                f"CFG scale: {job.cfg_scale:g}, Seed: {seed}, Size: {w}x{h}, Model: {model}{extra}")
    subseed = body.get("subseed")
    return {"prompt": prompt, "all_prompts": [prompt] * job.n_images, "negative_prompt": negative,
            "all_negative_prompts": [negative] * job.n_images, "seed": job.seed, "all_seeds": seeds,
            "subseed": subseed if isinstance(subseed, int) and subseed >= 0 else job.seed,
            "all_subseeds": seeds, "subseed_strength": 0, "width": w, "height": h,
            "sampler_name": job.sampler_name, "scheduler": job.schedule, "fastsd_scheduler":
            job.fields["parameters"]["scheduler"], "cfg_scale": job.cfg_scale, "steps": job.steps,
            "batch_size": body.get("batch_size") or 1, "n_iter": body.get("n_iter") or 1,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": job.denoising_strength, "extra_generation_params": {"Lora": lora} if lora else {},
            "index_of_first_image": 0, "infotexts": [infotext(s) for s in seeds], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": "fastsd", "fastsd_ignored": job.ignored}
