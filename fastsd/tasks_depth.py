"""Depth-to-image, as diffusers' StableDiffusionDepth2ImgPipeline runs it, step for step: image-to-image
(`strength` picks the start step, the image's latents are noised to it) with a 5-channel UNet that reads
[latents, depth] every step, the depth map at the latent size in [-1, 1] (fastsd.depth).

The depth map is the caller's (`depth_map`: one for all images, one per prompt or one per generated image) or,
without one, the model folder's own DPT estimator's, computed once per distinct input image."""
from __future__ import annotations

import time

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from . import depth
from .errors import InvalidParameter
from .tasks import ImageToImage, _as_items, _Prepared, _spread, strength_value, target_size


class DepthToImage(ImageToImage):
    """ImageToImage whose UNet input is [latents, depth] (5 channels)."""
    name = "depth"

    def __init__(self, prepared: _Prepared, strength: float, scaling: float, depth_maps: torch.Tensor, guided: bool,
                 latent_channels: int = 4):
        super().__init__(prepared, strength, scaling, latent_channels)
        self.depth = torch.cat([depth_maps] * 2) if guided else depth_maps

    def unet_input(self, model_in: torch.Tensor) -> torch.Tensor:
        return torch.cat([model_in, self.depth.to(model_in.device, model_in.dtype)], dim=1)


def check(model, *, image, mask_image, strength, height, width, resize, depth_map=None, **unused):
    """(height, width) of the output, checked before anything runs."""
    if unused:
        name = next(iter(unused))
        value = f"a {type(unused[name]).__name__}" if hasattr(unused[name], "shape") else unused[name]
        raise InvalidParameter(name, value, "nothing with a depth-to-image model (it is the x4 upscaler's)")
    if image is None:
        raise InvalidParameter("image", None, "an image: this is a depth-to-image model (5-channel UNet); its "
                               "output follows the image's composition and depth")
    if mask_image is not None:
        raise InvalidParameter("mask_image", "a mask", "no mask with a depth-to-image model")
    strength_value(strength)
    if depth_map is None and model.extra.get("depth_estimator") is None:
        raise InvalidParameter("depth_map", None, f"a depth map (--depth-map PNG or .npy): {model.name} has no depth "
                               "estimator (depth_estimator and feature_extractor in its folder) to compute one")
    if depth_map is not None:
        depth.as_maps(depth_map)  # readable and of a shape that can be a map
    return target_size(image, None, height, width, resize, model.vae_scale_factor)


def make(model, backend, *, image, strength, prompts: int, per_prompt: int, height: int, width: int, guided: bool,
         depth_map=None, **unused) -> DepthToImage:
    """The task for one call: images preprocessed as for image-to-image, depth maps at the latent size."""
    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
    items = _as_items(image, "image")
    try:
        images = processor.preprocess(items, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as e:
        why = str(e).splitlines()[0][:120]
        raise InvalidParameter("image", type(items[0]).__name__, f"RGB images ({why})") from None
    prepared = _Prepared(images, _spread(len(items), "image", prompts, per_prompt))
    scale = model.vae_scale_factor
    t0 = time.perf_counter()
    if depth_map is not None:
        maps = depth.as_maps(depth_map)
        index = _spread(len(maps), "depth_map", prompts, per_prompt)
        name = "depth_map"
    else:  # the folder's estimator, once per distinct input image, on the image as the pipeline sees it
        first = {}
        for j, item in enumerate(items):
            first.setdefault(id(item), j)
        distinct = sorted(set(first.values()))
        pil = [items[j] if isinstance(items[j], Image.Image) else
               processor.postprocess(images[j:j + 1], output_type="pil")[0] for j in distinct]
        maps = depth.estimate(model.extra["depth_estimator"], model.extra["depth_processor"], pil)
        index = [distinct.index(first[id(items[b])]) for b in prepared.index]
        name = "depth_estimator"
    latent = depth.to_latent_size(maps, height // scale, width // scale, name if name == "depth_map" else "image")
    task = DepthToImage(prepared, strength_value(strength), model.vae.config.scaling_factor, latent[index], guided,
                        getattr(model.vae.config, "latent_channels", 4))
    task.timings["depth_map"] = time.perf_counter() - t0
    return task
