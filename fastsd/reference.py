"""The FP32 reference (diffusers' own StableDiffusionPipeline on the CPU) and the comparison of an
engine's output with it: max abs pixel error, PSNR, cosine of the final latents, per image."""
from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .lora import LoraSwitcher, ModuleWeights, read_lora, read_tensors
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
                  scheduler: str | None = None, safety_checker: bool = True, loras=(), allow_pickle: bool = False,
                  image=None, mask_image=None, strength: float = 0.8, eta: float = 0.0):
    """diffusers' pipeline in FP32 on the CPU over `model`'s modules. Returns (PIL images, final latents,
    nsfw flags, seconds). Run it before `optimize` takes the modules over. `loras` (fastsd.lora.LoraRef)
    are loaded with diffusers' own `load_lora_weights` and unloaded afterwards. With `image` (and
    `mask_image`) the image-to-image (inpaint) pipeline; pass the images at (height, width), one per
    generated image, so that each is encoded with its own generator as fastsd does."""
    task = "text2img" if image is None else "img2img" if mask_image is None else "inpaint"
    pipe = model.to_pipeline(with_safety_checker=safety_checker, task=task)
    pipe.to("cpu", torch.float32)
    if loras:
        _load_reference_loras(pipe, loras, allow_pickle)
    try:
        return _run(pipe, prompts, negatives, num_images_per_prompt=num_images_per_prompt, steps=steps,
                    guidance=guidance, height=height, width=width, seeds=seeds, scheduler=scheduler, task=task,
                    image=image, mask_image=mask_image, strength=strength, eta=eta)
    finally:
        if loras:
            pipe.unload_lora_weights()  # the modules go on to the engine without PEFT layers


def _load_reference_loras(pipe, loras, allow_pickle: bool) -> None:
    # fastsd's reader checks layers and shapes first: a LoRA for another model is a one-line error here
    # rather than a page of diffusers' load errors
    check = LoraSwitcher(ModuleWeights({"unet": pipe.unet, "text_encoder": pipe.text_encoder}))
    check.deltas([(read_lora(r.path, allow_pickle=allow_pickle, unet_config=pipe.unet.config), r.scale)
                  for r in loras])
    names = []
    for i, ref in enumerate(loras):
        path = Path(ref.path).expanduser()
        names.append(f"fastsd_ref_{i}")
        if path.suffix == ".safetensors":  # by path: diffusers then reads lora_alpha from the file's metadata too
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=names[-1])
        else:
            tensors, _ = read_tensors(path, allow_pickle)  # same pickle policy as the engine
            pipe.load_lora_weights(tensors, adapter_name=names[-1])
    pipe.set_adapters(names, adapter_weights=[r.scale for r in loras])


def _run(pipe, prompts, negatives, *, num_images_per_prompt, steps, guidance, height, width, seeds, scheduler,
         task="text2img", image=None, mask_image=None, strength=0.8, eta=0.0):
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    final = {}

    def keep_latents(p, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    t0 = time.perf_counter()
    size = {"height": height, "width": width} if task != "img2img" else {}  # img2img takes the image's size
    images = {} if image is None else {"image": image, "strength": strength}
    if mask_image is not None:
        images["mask_image"] = mask_image
    out = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=num_images_per_prompt,
               num_inference_steps=steps, guidance_scale=guidance, eta=eta, **size, **images,
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
