"""`fastsd.verify_pipeline(pipe, ...)`: what `fastsd verify` does, for a diffusers pipeline the user built.
The plain pipeline runs first (the reference), then `fastsd.accelerate` takes it over and the same call
runs again with the same seed; each image is compared (max abs, PSNR, cosine of the final latents) at the
tolerance of the coarser dtype of the two (fastsd/reference.py)."""
from __future__ import annotations

import time

import torch

from .accelerate import accelerate, accelerated
from .errors import InvalidParameter
from .reference import TOLERANCES, compare, report_dict

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def run_pipeline(pipe, args, kwargs, seed: int):
    """One call with a fresh generator seeded `seed`; returns (PIL images, final latents fp32 CPU, seconds).
    The final latents come from callback_on_step_end (a user's callback given in kwargs still runs)."""
    final = {}
    user = kwargs.get("callback_on_step_end")
    inputs = list(dict.fromkeys(["latents", *kwargs.get("callback_on_step_end_tensor_inputs", [])]))

    def keep(p, i, t, kw):
        final["latents"] = kw["latents"]
        return user(p, i, t, kw) if user is not None else kw
    call = {**kwargs, "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "pil",
            "callback_on_step_end": keep, "callback_on_step_end_tensor_inputs": inputs}
    t0 = time.perf_counter()
    out = pipe(*args, **call)
    return out.images, final["latents"].float().cpu(), time.perf_counter() - t0


def verify_pipeline(pipe, *args, config=None, profile: str | None = None, seed: int = 0, **kwargs) -> dict:
    """Run `pipe(*args, **kwargs)` plain, accelerate it (`config` or `profile`, as for `fastsd.accelerate`),
    run it again, compare. Returns the report (`report["passed"]`, per-image rows); `pipe` stays
    accelerated. `kwargs` are the pipeline's own (prompt, image, num_inference_steps, ...); `generator` and
    `output_type` are set here."""
    if accelerated(pipe) is not None:
        raise InvalidParameter("pipe", "an accelerated pipeline", "the plain pipeline (fastsd.deaccelerate(pipe) first)")
    for k in ("generator", "output_type"):
        if k in kwargs:
            raise InvalidParameter(k, kwargs[k], f"nothing: verify_pipeline sets {k} itself (use seed=)")
    kwargs.setdefault("num_inference_steps", 25)
    ref_dtype = pipe.unet.dtype
    ref_images, ref_latents, ref_s = run_pipeline(pipe, args, kwargs, seed)
    accelerate(pipe, config, profile=profile)
    state = accelerated(pipe)
    images, latents, s = run_pipeline(pipe, args, kwargs, seed)
    names = [_DTYPE_NAMES.get(ref_dtype, "fp32"), state.config.dtype]
    tol = max((TOLERANCES[n] for n in names), key=lambda t: t.max_abs)  # the coarser of the two
    prompts = kwargs.get("prompt", args[0] if args else "")
    prompts = [prompts] * len(images) if isinstance(prompts, str) or prompts is None else \
        [p for p in prompts for _ in range(len(images) // max(1, len(prompts)))]
    rows = compare(ref_images, images, ref_latents, latents, prompts, [seed] * len(images), tol)
    return report_dict(rows, tol, pipeline=type(pipe).__name__, reference_dtype=names[0],
                       accelerate=state.describe(), steps=kwargs["num_inference_steps"], reference_seconds=ref_s,
                       accelerated_seconds=s)


# -- `fastsd verify --pipeline KIND,...`: diffusers' pipelines of each kind over a fastsd model ------------
PIPELINE_KINDS = ("txt2img", "img2img", "inpaint", "controlnet")


def check_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in str(text).split(",") if k.strip()]
    bad = [k for k in kinds if k not in PIPELINE_KINDS]
    if not kinds or bad:
        raise InvalidParameter("pipeline", text, "a comma list of " + ", ".join(PIPELINE_KINDS))
    return kinds


def random_controlnet(unet, seed: int = 0):
    """A ControlNet built from the UNet's config (its encoder weights copied, as diffusers' from_unet does),
    with seeded random weights in place of its zero convolutions, so that its residuals change the image."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    return cn


def build_pipeline(model, kind: str, controlnet=None):
    """diffusers' own pipeline of `kind` over the modules of `model` (an SDModel); no safety checker."""
    import diffusers
    parts = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                 scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline,
           "controlnet": diffusers.StableDiffusionControlNetPipeline}[kind]
    if kind == "controlnet":
        parts["controlnet"] = controlnet if controlnet is not None else random_controlnet(model.unet)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_inputs(kind: str, size: int, seed: int = 0) -> dict:
    """The image inputs of `kind`, made here: a seeded colour field (init or control image) and a centre mask."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    if kind == "txt2img":
        return {"height": size, "width": size}
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # 16 flat patches: an image with structure
    image = Image.fromarray(grid).resize((size, size), Image.NEAREST)
    if kind == "img2img":
        return {"image": image, "strength": 0.8}
    if kind == "controlnet":
        return {"image": image, "height": size, "width": size}
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return {"image": image, "mask_image": Image.fromarray(mask, "L"), "height": size, "width": size, "strength": 1.0}
