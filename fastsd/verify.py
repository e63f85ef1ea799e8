"""`fastsd verify`: the same prompts and seeds through the FP32 diffusers reference and through an
engine configuration, then the per-image comparison against the tolerance of that configuration's dtype."""
from __future__ import annotations

import copy
from dataclasses import asdict, replace

from . import tasks, verify_kinds
from . import validation as check
from .lora import as_refs
from .model import SDModel
from .optimize import OptimizeConfig, optimize
from .reference import compare, report_dict, run_reference, tolerance_for

DEFAULT_PROMPTS = ["a red circle on a blue background", "a small green square in the top left"]


def sample_inputs(task: str, height: int, width: int):
    """verify's default image and mask: a red disc on blue, and the top-left quarter to repaint."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (width, height), (20, 40, 160))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 30, 30))
    if task != "inpaint":
        return image, None
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, width // 2 - 1, height // 2 - 1), fill=255)
    return image, mask


def verify(model: SDModel, config: OptimizeConfig, *, prompts=None, negative_prompt=None,
           num_images_per_prompt: int = 1, steps: int = 25, guidance: float = 7.5, height=None, width=None,
           seed: int = 0, scheduler: str | None = None, progress: bool = False, engine_model=None,
           loras=(), allow_pickle: bool = False,
           task: str = "text2img", image=None, mask_image=None, strength: float | None = None, eta: float = 0.0):
    """Runs the reference on `model` first, then builds the engine (which takes the modules over) and
    compares. `engine_model` is what the engine runs when it is not `model` itself (an ONNX export).
    `loras` ([(path, scale), ...]): the reference loads them with diffusers' `load_lora_weights` (unfused
    PEFT layers), the engine fuses them (fastsd.lora). task img2img / inpaint compares with diffusers'
    StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on `image` (and `mask_image`), by
    default `sample_inputs` at the model's size. Returns (report dict, engine, engine result, reference
    images)."""
    [(report, engine, result)], ref_images = verify_each(
        model, [config], prompts=prompts, negative_prompt=negative_prompt,
        num_images_per_prompt=num_images_per_prompt, steps=steps, guidance=guidance, height=height, width=width,
        seed=seed, scheduler=scheduler, progress=progress, engine_model=engine_model, loras=loras,
        allow_pickle=allow_pickle, task=task, image=image, mask_image=mask_image, strength=strength, eta=eta)
    return report, engine, result, ref_images


def verify_each(model: SDModel, configs: list[OptimizeConfig], *, prompts=None, negative_prompt=None,
                num_images_per_prompt: int = 1, steps: int = 25, guidance: float = 7.5, height=None, width=None,
                seed: int = 0, scheduler: str | None = None, progress: bool = False, engine_model=None,
                loras=(), allow_pickle: bool = False,
                task: str = "text2img", image=None, mask_image=None, strength: float | None = None,
                eta: float = 0.0):
    """verify() for several configurations (e.g. one per step-caching interval) against one reference run.
    Each engine gets its own copy of the model. Returns ([(report, engine, result) per config], reference
    images)."""
    loras = as_refs(loras)
    if model.kind in ("depth", "upscale"):  # the model's own task and pipeline (fastsd.verify_kinds)
        for name, value in (("task", None if task == "text2img" else task), ("mask_image", mask_image),
                            ("loras", [str(r) for r in loras] or None)):
            if value is not None:
                raise check.InvalidParameter(name, value, f"nothing with a {model.kind} model (its task is its own)")
        return verify_kinds.verify_each(
            model, configs, prompts=prompts, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, steps=steps, guidance=guidance, seed=seed,
            scheduler=scheduler, progress=progress, engine_model=engine_model, image=image, strength=strength,
            height=height, width=width, eta=eta)
    if task not in tasks.TASKS:
        raise check.InvalidParameter("task", task, ", ".join(tasks.TASKS))
    prompts = check.prompts(prompts or DEFAULT_PROMPTS)
    negatives = check.negative_prompts(negative_prompt, len(prompts))
    if image is not None and height is None and width is None:
        width, height = image.size  # the output has the image's size, as in generate
    height = check.size("height", height or model.native_size)
    width = check.size("width", width or model.native_size)
    steps = check.steps(steps)
    eta = check.eta(eta)
    count = len(prompts) * check.num_images(num_images_per_prompt)
    seeds = check.seeds(seed, count)
    images = {}
    if task != "text2img":
        if image is None:
            image, mask_image = sample_inputs(task, height, width)
        elif task == "inpaint" and mask_image is None:
            mask_image = sample_inputs(task, image.size[1], image.size[0])[1]
        if task == "img2img":
            mask_image = None
        strength = tasks.strength_value(strength, task == "inpaint")
        tasks.check_inputs(image, mask_image, strength, model.unet.config.in_channels)
        # the reference gets the image at the output size, one per generated image (each encoded with its own
        # generator, as fastsd does)
        image = image.convert("RGB").resize((width, height)) if image.size != (width, height) else image
        if mask_image is not None and mask_image.size != (width, height):
            mask_image = mask_image.resize((width, height))
        images = {"image": [image] * count, "strength": strength}
        if mask_image is not None:
            images["mask_image"] = [mask_image] * count
    ref_images, ref_latents, ref_nsfw, ref_s = run_reference(
        model, prompts, negatives, num_images_per_prompt=num_images_per_prompt, steps=steps,
        guidance=check.guidance(guidance), height=height, width=width, seeds=seeds, scheduler=scheduler,
        safety_checker=configs[0].safety_checker, loras=loras, allow_pickle=allow_pickle, eta=eta, **images)
    source = engine_model if engine_model is not None else model
    out = []
    for i, config in enumerate(configs):
        engine = optimize(source if i == len(configs) - 1 else copy.deepcopy(source), config)
        if loras:
            engine.set_loras(loras, allow_pickle=allow_pickle)
        result = engine.generate(prompts, negatives, num_images_per_prompt=num_images_per_prompt,
                                 num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                                 seed=seeds, scheduler=scheduler, progress=progress, eta=eta, **images)
        tol = tolerance_for(config)
        rows = compare(ref_images, result.images, ref_latents, result.latents, result.prompts, seeds, tol)
        report = report_dict(rows, tol, model=model.name, task=task, strength=images.get("strength"),
                             config=asdict(config), engine=engine.describe(),
                             tolerance_name=tol.name, steps=steps, guidance=guidance, eta=eta, height=height,
                             width=width, scheduler=scheduler or engine.describe()["scheduler"],
                             reference_seconds=ref_s, engine_seconds=result.timings["total"],
                             engine_timings=result.timings, nsfw_reference=ref_nsfw,
                             nsfw_engine=result.nsfw_content_detected, loras=[str(r) for r in loras])
        out.append((report, engine, result))
    return out, ref_images


def with_intervals(config: OptimizeConfig, intervals: list[int]) -> list[OptimizeConfig]:
    return [replace(config, cache_interval=n) for n in intervals]
