"""`fastsd verify`: the same prompts and seeds through the FP32 diffusers reference and through an
engine configuration, then the per-image comparison against the tolerance of that configuration's dtype."""
from __future__ import annotations

import copy
from dataclasses import asdict, replace

from . import validation as check
from .loading import SDModel
from .optimize import OptimizeConfig, optimize
from .reference import compare, report_dict, run_reference, tolerance_for

DEFAULT_PROMPTS = ["a red circle on a blue background", "a small green square in the top left"]


def verify(model: SDModel, config: OptimizeConfig, *, prompts=None, negative_prompt=None,
           num_images_per_prompt: int = 1, steps: int = 25, guidance: float = 7.5, height=None, width=None,
           seed: int = 0, scheduler: str | None = None, progress: bool = False, engine_model=None):
    """Runs the reference on `model` first, then builds the engine (which takes the modules over) and
    compares. `engine_model` is what the engine runs when it is not `model` itself (an ONNX export).
    Returns (report dict, engine, engine result, reference images)."""
    [(report, engine, result)], ref_images = verify_each(
        model, [config], prompts=prompts, negative_prompt=negative_prompt,
        num_images_per_prompt=num_images_per_prompt, steps=steps, guidance=guidance, height=height, width=width,
        seed=seed, scheduler=scheduler, progress=progress, engine_model=engine_model)
    return report, engine, result, ref_images


def verify_each(model: SDModel, configs: list[OptimizeConfig], *, prompts=None, negative_prompt=None,
                num_images_per_prompt: int = 1, steps: int = 25, guidance: float = 7.5, height=None, width=None,
                seed: int = 0, scheduler: str | None = None, progress: bool = False, engine_model=None):
    """verify() for several configurations (e.g. one per step-caching interval) against one reference run.
    Each engine gets its own copy of the model. Returns ([(report, engine, result) per config], reference
    images)."""
    prompts = check.prompts(prompts or DEFAULT_PROMPTS)
    negatives = check.negative_prompts(negative_prompt, len(prompts))
    height = check.size("height", height or model.native_size)
    width = check.size("width", width or model.native_size)
    steps = check.steps(steps)
    count = len(prompts) * check.num_images(num_images_per_prompt)
    seeds = check.seeds(seed, count)
    ref_images, ref_latents, ref_nsfw, ref_s = run_reference(
        model, prompts, negatives, num_images_per_prompt=num_images_per_prompt, steps=steps,
        guidance=check.guidance(guidance), height=height, width=width, seeds=seeds, scheduler=scheduler,
        safety_checker=configs[0].safety_checker)
    source = engine_model if engine_model is not None else model
    out = []
    for i, config in enumerate(configs):
        engine = optimize(source if i == len(configs) - 1 else copy.deepcopy(source), config)
        result = engine.generate(prompts, negatives, num_images_per_prompt=num_images_per_prompt,
                                 num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                                 seed=seeds, scheduler=scheduler, progress=progress)
        tol = tolerance_for(config)
        rows = compare(ref_images, result.images, ref_latents, result.latents, result.prompts, seeds, tol)
        report = report_dict(rows, tol, model=model.name, config=asdict(config), engine=engine.describe(),
                             tolerance_name=tol.name, steps=steps, guidance=guidance, height=height, width=width,
                             scheduler=scheduler or engine.describe()["scheduler"],
                             reference_seconds=ref_s, engine_seconds=result.timings["total"],
                             engine_timings=result.timings, nsfw_reference=ref_nsfw,
                             nsfw_engine=result.nsfw_content_detected)
        out.append((report, engine, result))
    return out, ref_images


def with_intervals(config: OptimizeConfig, intervals: list[int]) -> list[OptimizeConfig]:
    return [replace(config, cache_interval=n) for n in intervals]
