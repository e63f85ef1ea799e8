"""`fastsd generate ... --upscale`: the x4 upscaler over each image a generation made, with that image's own
prompt and seed, so one command gives 4x the size (a 512x512 image becomes 2048x2048)."""
from __future__ import annotations

from .errors import InvalidParameter

DEFAULT_UPSCALER = "sd-x4-upscaler"


def check_upscaler(engine) -> None:
    if engine.model.kind != "upscale":
        raise InvalidParameter("upscaler", engine.model.name, "an x4 upscaler (a folder or preset whose UNet takes 7 "
                               f"input channels, e.g. {DEFAULT_UPSCALER}); this is a {engine.model.kind} model")


def upscale_images(engine, images, prompts, seeds, *, negative_prompt=None, steps: int = 50, guidance=7.5,
                   noise_level=None, tile_size=None, progress: bool = True):
    """Each image upscaled 4x with its prompt and seed; returns (images, seconds)."""
    check_upscaler(engine)
    out, seconds = [], 0.0
    for image, prompt, seed in zip(images, prompts, seeds):
        r = engine.generate(prompt, negative_prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                            image=image, noise_level=noise_level, tile_size=tile_size, progress=progress)
        out.append(r.images[0])
        seconds += r.timings["total"]
    return out, seconds
