"""The x4 upscaler, as diffusers' StableDiffusionUpscalePipeline runs it, step for step: the low-res image (in
[-1, 1]) is noised to `noise_level` by the model's low_res_scheduler (DDPM) and concatenated to the latents
every step (7 UNet input channels), the noise level goes in as the UNet's class label, and the latents have
the low-res image's size; the VAE, which upsamples 4x, gives an image 4x the input's size.

Seeds per generated image, as everywhere in fastsd: image i draws its low-res noise, then its start latents,
from seed i, in the order the pipeline does when it is given one input image per generated image.

Large inputs run tiled (fastsd.upscale_tiles): every step, the UNet sees overlapping windows of at most
`tile_size` x `tile_size` latents (= input pixels), and the noise predictions are blended linearly where the
windows overlap, so no seam is left; an input within one tile runs exactly as the pipeline does."""
from __future__ import annotations

import numbers

import torch
from diffusers.image_processor import VaeImageProcessor

from . import upscale_tiles
from . import validation as limits
from .errors import InvalidParameter, ModelLoadError
from .tasks import TextToImage, _as_items, _size_of, _spread

DEFAULT_NOISE_LEVEL = 20  # the model card's (and the pipeline's) default
SCALE = 4  # the upscaler's VAE: output = 4 x input


def noise_level_value(value, max_noise_level: int) -> int:
    if value is None:
        return DEFAULT_NOISE_LEVEL
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= max_noise_level:
        raise InvalidParameter("noise_level", value, f"an integer in [0, {max_noise_level}] (the model's "
                               "max_noise_level): how much noise the low-res image gets; more gives more freedom")
    return int(value)


class Upscale(TextToImage):
    """Pure noise latents at the input's size; UNet input [latents, noised low-res image], noise level as label."""
    name = "upscale"

    def __init__(self, images: torch.Tensor, index: list[int], noise_level: int, low_res_scheduler, guided: bool,
                 tile: upscale_tiles.Tiling):
        super().__init__()
        self.images, self.index, self.noise_level = images, index, noise_level
        self.low_res, self.guided, self.tile = low_res_scheduler, guided, tile

    def start(self, sched, steps, backend, generators, latent_shape, device):
        level = torch.tensor([self.noise_level], dtype=torch.long)
        noised = []
        for b, g in zip(self.index, generators):  # per generator: the low-res noise first, then the latents
            img = self.images[b:b + 1]
            noised.append(self.low_res.add_noise(img, torch.randn(img.shape, generator=g, dtype=torch.float32), level))
        cond = torch.cat(noised)
        self.cond = (torch.cat([cond] * 2) if self.guided else cond).to(device)
        self.labels = torch.full((self.cond.shape[0],), self.noise_level, dtype=torch.long, device=device)
        latents = torch.cat([torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
                             for g in generators]).to(device)
        return sched.timesteps, latents * sched.init_noise_sigma

    def unet_input(self, model_in: torch.Tensor) -> torch.Tensor:
        return torch.cat([model_in, self.cond.to(model_in.dtype)], dim=1)

    def predict(self, backend, model_in: torch.Tensor, t, text_emb: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        return upscale_tiles.run_tiled(
            lambda x: backend.unet(x, t, text_emb, class_labels=self.labels, **unet_kwargs).float(), model_in,
            self.tile)


def check(model, *, image, mask_image, strength, height, width, resize, noise_level=None, tile_size=None, **unused):
    """(height, width) of the output (4x the input's), checked before anything runs."""
    if unused:
        name = next(iter(unused))
        value = f"a {type(unused[name]).__name__}" if hasattr(unused[name], "shape") else unused[name]
        raise InvalidParameter(name, value, "nothing with the x4 upscaler (it is depth-to-image's)")
    if model.extra.get("low_res_scheduler") is None:
        raise ModelLoadError(f"model: {model.name} has a 7-channel (x4 upscaler) UNet but no low_res_scheduler; load "
                             "it from its StableDiffusionUpscalePipeline folder or pipeline")
    if image is None:
        raise InvalidParameter("image", None, "a low-resolution image: this is the x4 upscaler (7-channel UNet)")
    for name, value in (("mask_image", mask_image), ("strength", strength)):
        if value is not None:
            raise InvalidParameter(name, value, "nothing with the x4 upscaler (it takes an image and a noise level)")
    if resize or height is not None or width is not None:
        raise InvalidParameter("height" if height is not None else "width" if width is not None else "resize",
                               height or width or resize, "nothing with the x4 upscaler: the output is 4x the "
                               "input's size; resize the input instead")
    noise_level_value(noise_level, int(model.extra.get("max_noise_level", 350)))
    tiling(model, tile_size)
    items = _as_items(image, "image")
    sizes = {_size_of(i) for i in items}
    if len(sizes) > 1:
        raise InvalidParameter("image", sorted(sizes), "images of one size (width, height)")
    w, h = sizes.pop()
    # the UNet halves the latents per down block; the image processor rounds to the VAE's factor
    multiple = max(2 ** (len(model.unet.config.block_out_channels) - 1), model.vae_scale_factor)
    if w % multiple or h % multiple:
        raise InvalidParameter("image", f"{w}x{h}", f"a width and height that are multiples of {multiple} (the "
                               "upscaler's latents have the input's size)")
    for v in (w, h):  # the output's limits are every task's
        if not limits.MIN_SIZE <= SCALE * v <= limits.MAX_SIZE:
            raise InvalidParameter("image", f"{w}x{h}", f"an input whose 4x output is within {limits.MIN_SIZE}.."
                                   f"{limits.MAX_SIZE} pixels: {limits.MIN_SIZE // SCALE}..{limits.MAX_SIZE // SCALE} "
                                   "pixels a side")
    return SCALE * h, SCALE * w


def tiling(model, tile_size) -> upscale_tiles.Tiling:
    multiple = 2 ** (len(model.unet.config.block_out_channels) - 1)
    return upscale_tiles.tiling(tile_size, multiple)


def make(model, backend, *, image, prompts: int, per_prompt: int, height: int, width: int, guided: bool,
         noise_level=None, tile_size=None, **unused) -> Upscale:
    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor, resample="bicubic")
    items = _as_items(image, "image")
    try:
        images = processor.preprocess(items).to(torch.float32)
    except (ValueError, TypeError) as e:
        why = str(e).splitlines()[0][:120]
        raise InvalidParameter("image", type(items[0]).__name__, f"RGB images ({why})") from None
    return Upscale(images, _spread(len(items), "image", prompts, per_prompt),
                   noise_level_value(noise_level, int(model.extra.get("max_noise_level", 350))),
                   model.extra["low_res_scheduler"], guided, tiling(model, tile_size))
