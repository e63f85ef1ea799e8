"""`fastsd verify` for a depth-to-image model and the x4 upscaler: diffusers' StableDiffusionDepth2ImgPipeline
(with `depth_map`) or StableDiffusionUpscalePipeline in FP32 on the CPU (the reference) against the engine, on
the same prompts, seeds and inputs; compared per image as every task is (fastsd.reference).

With no inputs given it makes its own: a red disc on blue at the model's size (the upscaler: a quarter of it),
and for depth a radial depth map (near at the disc's centre)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict

import numpy as np
import torch

from . import depth, tasks_upscale
from . import validation as check
from .optimize import optimize
from .reference import compare, report_dict, tolerance_for
from .schedulers import make_scheduler
from .tasks import strength_value

DEFAULT_PROMPTS = ["a red circle on a blue background", "a small green square in the top left"]


def sample_image(size: tuple[int, int]):
    """(width, height) -> a red disc on blue, verify's test image."""
    from PIL import Image, ImageDraw
    w, h = size
    image = Image.new("RGB", (w, h), (20, 40, 160))
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(200, 30, 30))
    return image


def sample_depth_map(size: tuple[int, int]) -> np.ndarray:
    """(width, height) -> an HxW float32 map, largest (nearest, as MiDaS writes inverse depth) at the centre."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / w, (yy - h / 2) / h)
    return (1.0 - r).astype(np.float32)


def sample_inputs(model, height=None, width=None) -> dict:
    """The inputs verify uses for this model's kind when none are given."""
    if model.kind == "upscale":
        side = max(model.native_size, check.MIN_SIZE) // tasks_upscale.SCALE  # 128 for the x4 upscaler
        return {"image": sample_image((width // 4 if width else side, height // 4 if height else side))}
    size = (width or model.native_size, height or model.native_size)
    return {"image": sample_image(size), "depth_map": sample_depth_map(size)}


def run_reference(model, prompts: list[str], negatives: list[str], *, steps: int, guidance: float, seeds: list[int],
                  scheduler: str | None, image, depth_map=None, strength: float = 0.8, noise_level: int = 20,
                  eta: float = 0.0):
    """diffusers' pipeline in FP32 on the CPU over `model`'s modules, one input per generated image (`prompts`
    already one per image), each with its own generator. Returns (PIL images, final latents, seconds)."""
    pipe = model.to_pipeline()
    pipe.to("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    final = {}
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kw = dict(negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
              output_type="pil", image=[image] * len(prompts), eta=eta)
    t0 = time.perf_counter()
    if model.kind == "depth":
        def keep(p, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs
        maps = None if depth_map is None else torch.stack(depth.as_maps(depth_map) * len(prompts))
        out = pipe(prompts, depth_map=maps, strength=strength, callback_on_step_end=keep,
                   callback_on_step_end_tensor_inputs=["latents"], **kw)
    else:
        def keep_old(i, t, latents):  # the upscale pipeline has the older per-step callback only
            final["latents"] = latents
        out = pipe(prompts, noise_level=noise_level, callback=keep_old, callback_steps=1, **kw)
    return out.images, final["latents"].float().cpu(), time.perf_counter() - t0


def verify_each(model, configs, *, prompts=None, negative_prompt=None, num_images_per_prompt: int = 1,
                steps: int = 25, guidance: float = 7.5, seed: int = 0, scheduler: str | None = None,
                progress: bool = False, engine_model=None, image=None, depth_map=None, strength=None,
                noise_level=None, tile_size=None, height=None, width=None, eta: float = 0.0):
    """verify_each of fastsd.verify for a depth or upscale model. Returns ([(report, engine, result) per config],
    reference images)."""
    prompts = check.prompts(prompts or DEFAULT_PROMPTS)
    negatives = check.negative_prompts(negative_prompt, len(prompts))
    n_img = check.num_images(num_images_per_prompt)
    steps = check.steps(steps)
    eta = check.eta(eta)
    count = len(prompts) * n_img
    seeds = check.seeds(seed, count)
    made = sample_inputs(model, height, width)
    if image is None:
        image = made["image"]
    elif model.kind == "depth" and (height or width) and image.size != (width or image.size[0],
                                                                         height or image.size[1]):
        image = image.resize((width or image.size[0], height or image.size[1]))
    inputs = {}
    map_source = None
    if model.kind == "depth":
        map_source = "given" if depth_map is not None else "estimated"
        if depth_map is None and (model.extra.get("depth_estimator") is None or image is made["image"]):
            depth_map, map_source = sample_depth_map(image.size), "made"
        strength = strength_value(strength)
        inputs = {"depth_map": depth_map, "strength": strength}
        ref_kw = dict(depth_map=depth_map, strength=strength)
    else:
        if strength is not None:
            raise check.InvalidParameter("strength", strength, "nothing with the x4 upscaler (it takes --noise-level)")
        noise_level = tasks_upscale.noise_level_value(noise_level, int(model.extra.get("max_noise_level", 350)))
        inputs = {"noise_level": noise_level, "tile_size": tile_size}
        ref_kw = dict(noise_level=noise_level)
    per_image = [p for p in prompts for _ in range(n_img)]
    ref_images, ref_latents, ref_s = run_reference(
        model, per_image, [n for n in negatives for _ in range(n_img)], steps=steps, guidance=check.guidance(guidance),
        seeds=seeds, scheduler=scheduler, image=image.convert("RGB"), eta=eta, **ref_kw)
    source = engine_model if engine_model is not None else model
    out = []
    for i, config in enumerate(configs):
        engine = optimize(source if i == len(configs) - 1 else copy.deepcopy(source), config)
        result = engine.generate(prompts, negatives, num_images_per_prompt=n_img, num_inference_steps=steps,
                                 guidance_scale=guidance, seed=seeds, scheduler=scheduler, progress=progress,
                                 image=image.convert("RGB"), eta=eta, **inputs)
        tol = tolerance_for(config)
        rows = compare(ref_images, result.images, ref_latents, result.latents, result.prompts, seeds, tol)
        w, h = result.images[0].size
        report = report_dict(rows, tol, model=model.name, task=model.kind, strength=inputs.get("strength"),
                             noise_level=inputs.get("noise_level"), input_size=list(image.size),
                             depth_map=map_source,
                             config=asdict(config), engine=engine.describe(), tolerance_name=tol.name, steps=steps,
                             guidance=guidance, eta=eta, height=h, width=w,
                             scheduler=scheduler or engine.describe()["scheduler"], reference_seconds=ref_s,
                             engine_seconds=result.timings["total"], engine_timings=result.timings,
                             nsfw_reference=[False] * len(rows), nsfw_engine=result.nsfw_content_detected, loras=[])
        out.append((report, engine, result))
    return out, ref_images
