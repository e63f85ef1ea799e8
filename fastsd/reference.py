"""The FP32 reference (diffusers' own StableDiffusionPipeline on the CPU) and the comparison of an
engine's output with it: max abs pixel error, PSNR, cosine of the final latents, per image."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .schedulers import make_scheduler


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # largest pixel difference allowed, in 0..255 levels
    min_psnr: float  # dB, over the uint8 image
    min_latent_cosine: float
    name: str = ""


# Measured on the tiny model, 2 cores, torch 2.13 CPU (tests/test_reference.py re-measures them):
# FP32 with the same attention maths is bit-identical to diffusers (0 levels, PSNR inf); other FP32
# kernels differ by float rounding only. Half precision is judged on what a viewer sees.
TOLERANCES = {
    "fp32": Tolerance(max_abs=2.0, min_psnr=45.0, min_latent_cosine=0.99999, name="fp32"),
    "bf16": Tolerance(max_abs=255.0, min_psnr=30.0, min_latent_cosine=0.99, name="bf16"),
    "fp16": Tolerance(max_abs=255.0, min_psnr=30.0, min_latent_cosine=0.99, name="fp16"),
}
# What trades fidelity for speed on purpose (step caching, int8: the `fastest` profile) is judged looser:
# the image keeps its composition and colours but moves by more than rounding. Measured with step caching
# at interval 3, 25 PNDM steps: fastsd-shapes 24-31 dB (colour verdicts unchanged), tiny 25-30 dB (README,
# "Speed profiles").
APPROXIMATE = Tolerance(max_abs=255.0, min_psnr=20.0, min_latent_cosine=0.95, name="approximate (fastest)")


def tolerance_for(config) -> Tolerance:
    """The tolerance `verify` holds `config` to: its dtype's, or APPROXIMATE where it caches steps or runs int8."""
    if getattr(config, "cache_interval", 1) > 1 or getattr(config, "int8", "off") != "off":
        return APPROXIMATE
    return TOLERANCES[config.dtype]


def json_psnr(value: float) -> float | None:
    """Standard JSON has no Infinity: a bit-identical image's PSNR is written as null (with identical: true)."""
    return None if math.isinf(value) else value


@dataclass
class ImageParity:
    index: int
    prompt: str
    seed: int
    max_abs: float
    psnr_db: float
    latent_cosine: float
    passed: bool


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def run_reference(model, prompts: list[str], negatives: list[str], *, num_images_per_prompt: int,
                  steps: int, guidance: float, height: int, width: int, seeds: list[int],
                  scheduler: str | None = None, safety_checker: bool = True):
    """diffusers' pipeline in FP32 on the CPU over `model`'s modules. Returns (PIL images, final latents,
    nsfw flags, seconds). Run it before `optimize` takes the modules over."""
    pipe = model.to_pipeline(with_safety_checker=safety_checker)
    pipe.to("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    final = {}

    def keep_latents(p, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    t0 = time.perf_counter()
    out = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=num_images_per_prompt,
               num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pil",
               callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    seconds = time.perf_counter() - t0
    nsfw = out.nsfw_content_detected or [False] * len(out.images)
    return out.images, final["latents"].float().cpu(), [bool(f) for f in nsfw], seconds


def compare(ref_images, images, ref_latents: torch.Tensor, latents: torch.Tensor, prompts, seeds,
            tolerance: Tolerance) -> list[ImageParity]:
    a, b = to_uint8(ref_images), to_uint8(images)
    rows = []
    for i in range(len(a)):
        cos = torch.nn.functional.cosine_similarity(ref_latents[i].flatten().double(),
                                                    latents[i].flatten().double(), dim=0).item()
        err = float(np.abs(a[i].astype(np.int16) - b[i].astype(np.int16)).max())
        p = psnr(a[i], b[i])
        ok = err <= tolerance.max_abs and p >= tolerance.min_psnr and cos >= tolerance.min_latent_cosine
        rows.append(ImageParity(i, prompts[i], seeds[i], err, p, cos, ok))
    return rows


def report_dict(rows: list[ImageParity], tolerance: Tolerance, **extra) -> dict:
    """The report `verify --json` writes: standard JSON (an infinite PSNR becomes null, identical: true)."""
    images = [{**asdict(r), "psnr_db": json_psnr(r.psnr_db), "identical": math.isinf(r.psnr_db)} for r in rows]
    return {**extra, "tolerance": asdict(tolerance), "images": images, "passed": all(r.passed for r in rows)}
