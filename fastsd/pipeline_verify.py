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
        raise InvalidParameter("pipe", "an accelerated pipeline", "the plain pipeline (fastsd.restore(pipe) first)")
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
