"""What differs between text-to-image, image-to-image and inpainting, behind one small hook the engine's
loop calls: the start latents (and the start step), the UNet input, and a step's result.

Image-to-image follows diffusers' StableDiffusionImg2ImgPipeline and inpainting its
StableDiffusionInpaintPipeline, step for step: `strength` picks the start step (get_timesteps), the VAE
encode samples with the image's own seeded generator, the mask is binarized (white = repaint) and
resized to the latents by nearest neighbour; a 9-channel inpainting UNet gets [latents, mask,
masked-image latents] concatenated, and an ordinary 4-channel UNet gets, after every step, the latents
outside the mask put back from the original noised to the next timestep.

Seeds are per generated image, as for text: image i draws its VAE sample and its noise from seed i in
the order diffusers does when it is given one input image per generated image, so every image is
reproducible alone and in any batch."""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from .errors import InvalidParameter

TASKS = ("text2img", "img2img", "inpaint")


class TextToImage:
    """Pure noise at the first timestep; the loop as StableDiffusionPipeline runs it."""
    name = "text2img"
    timings: dict

    def __init__(self):
        self.timings = {}

    def start(self, sched, steps: int, backend, generators, latent_shape, device):
        latents = torch.cat([torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
                             for g in generators]).to(device)
        return sched.timesteps, latents * sched.init_noise_sigma

    def unet_input(self, model_in: torch.Tensor) -> torch.Tensor:
        return model_in

    def predict(self, backend, model_in: torch.Tensor, t, text_emb: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        """The UNet's prediction for this step (the x4 upscaler's adds its noise level, in tiles)."""
        return backend.unet(model_in, t, text_emb, **unet_kwargs)

    def after_step(self, latents: torch.Tensor, i: int, timesteps, sched) -> torch.Tensor:
        return latents


def _size_of(item) -> tuple[int, int]:
    """(width, height) of a PIL image, an HxWxC array or a CxHxW tensor."""
    if isinstance(item, Image.Image):
        return item.size
    if isinstance(item, np.ndarray):
        return item.shape[-2], item.shape[-3]
    return int(item.shape[-1]), int(item.shape[-2])


def _as_items(value, name: str) -> list:
    """One image or a list of them -> a list of single images (a 4-D tensor or array is split)."""
    if isinstance(value, (Image.Image, np.ndarray, torch.Tensor)):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return list(value)
        if isinstance(value, np.ndarray) and value.ndim == 4:
            return list(value)
        return [value]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (Image.Image, np.ndarray, torch.Tensor)) for v in value):
        return list(value)
    raise InvalidParameter(name, type(value).__name__, "a PIL image, a CxHxW tensor in [-1, 1] or [0, 1], "
                           "or a list of them")


def strength_value(value, inpaint: bool = False) -> float:
    """None: diffusers' defaults, 0.8 for image-to-image and 1.0 for inpainting."""
    if value is None:
        return 1.0 if inpaint else 0.8
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise InvalidParameter("strength", value, "a number in (0, 1]: how much of the image is repainted")
    return float(value)


def check_inputs(image, mask_image, strength, unet_in_channels: int) -> None:
    """The combinations that cannot work, before anything runs."""
    if mask_image is not None and image is None:
        raise InvalidParameter("mask_image", "a mask", "a mask only together with an image (--image)")
    if unet_in_channels == 9 and image is None:
        raise InvalidParameter("image", None, "an image and a mask: this is a 9-channel inpainting model")
    if unet_in_channels == 9 and mask_image is None:
        raise InvalidParameter("mask_image", None, "a mask (white = repaint): this is a 9-channel inpainting model")
    if unet_in_channels not in (4, 9):
        raise InvalidParameter("model", f"a UNet with {unet_in_channels} input channels", "4 or 9 (inpainting)")
    if image is not None:
        strength_value(strength, mask_image is not None)


def target_size(image, mask_image, height, width, resize: bool, scale: int) -> tuple[int, int]:
    """(height, width) of the output: the one asked for, else the image's own. Images of another size are
    resized when `resize` is set and refused otherwise; a mask must have its image's size."""
    items = _as_items(image, "image")
    sizes = {_size_of(i) for i in items}
    if len(sizes) > 1:
        raise InvalidParameter("image", sorted(sizes), "images of one size (width, height)")
    w0, h0 = sizes.pop()
    if mask_image is not None:
        msizes = {_size_of(m) for m in _as_items(mask_image, "mask_image")}
        if msizes != {(w0, h0)}:
            raise InvalidParameter("mask_image", f"size {sorted(msizes)}", f"the image's size {w0}x{h0}")
    if height is None and width is None and resize:
        h, w = h0 // scale * scale, w0 // scale * scale  # as diffusers' image processor rounds
    else:
        h, w = height or h0, width or w0
    if (w, h) != (w0, h0) and not resize:
        raise InvalidParameter("image", f"{w0}x{h0}", f"an image of {w}x{h} (width x height) as asked, or "
                               "resize it (--resize)")
    if h % scale or w % scale:
        raise InvalidParameter("image", f"{w0}x{h0}", f"a width and height that are multiples of {scale}, or "
                               f"resize it (--resize: rounded down to {w0 // scale * scale}x{h0 // scale * scale})")
    return h, w


@dataclass
class _Prepared:
    images: torch.Tensor  # [k, 3, H, W] in [-1, 1], the distinct input images
    index: list[int]  # generated image b uses images[index[b]]
    masks: torch.Tensor | None = None  # [m, 1, H, W] in {0, 1}
    mask_index: list[int] | None = None


def _spread(k: int, name: str, prompts: int, per_prompt: int) -> list[int]:
    """Which of k inputs each generated image (prompt-major) uses: one for all, one per prompt, or one each."""
    batch = prompts * per_prompt
    if k == 1:
        return [0] * batch
    if k == batch:
        return list(range(batch))
    if k == prompts:
        return [p for p in range(prompts) for _ in range(per_prompt)]
    raise InvalidParameter(name, f"{k} images", f"1, one per prompt ({prompts}) or one per generated image ({batch})")


class ImageToImage(TextToImage):
    """StableDiffusionImg2ImgPipeline: the image's latents noised to the start step that `strength` picks."""
    name = "img2img"

    def __init__(self, prepared: _Prepared, strength: float, scaling: float, latent_channels: int = 4):
        super().__init__()
        self.prepared, self.strength, self.scaling = prepared, strength, scaling
        self.latent_channels, self.sampled = latent_channels, True

    def start_timesteps(self, sched, steps: int):
        """diffusers' get_timesteps: the last int(steps * strength) steps of the schedule."""
        init = min(int(steps * self.strength), steps)
        t_start = max(steps - init, 0)
        if steps - t_start < 1:
            raise InvalidParameter("strength", self.strength, f"at least 1/{steps} with {steps} steps "
                                   "(int(steps * strength) steps are run; this gives none)")
        order = getattr(sched, "order", 1)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * order)
        return sched.timesteps[t_start * order:]

    def _encode(self, backend, sel: list[int], images: torch.Tensor, generators) -> torch.Tensor:
        t0 = time.perf_counter()
        distinct = sorted(set(sel))
        # the encoder's output is the same for equal images; only the sample differs per generator
        params_for = {k: j for j, k in enumerate(distinct)}
        # one image per encoder call, as diffusers' pipelines encode with per-image generators: a batched
        # convolution may take another kernel (measured on AVX-512 without AMX: 1e-5 apart after 4 steps)
        params = torch.cat([backend.encode_image(images[i:i + 1].to(backend.device)).float().cpu()
                            for i in distinct])
        # a tiny VAE's encoder gives the latents (latent_channels), as diffusers' retrieve_latents reads
        # `.latents`: no sample, no draw from the generators; a KL VAE's gives mean and log-variance (twice that)
        self.sampled = params.shape[1] == 2 * self.latent_channels
        if not self.sampled:
            self.timings["vae_encode"] = self.timings.get("vae_encode", 0.0) + time.perf_counter() - t0
            return self.scaling * params[[params_for[b] for b in sel]]
        mean, logvar = torch.chunk(params, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        out = []
        for b, g in zip(sel, generators):
            j = params_for[b]
            eps = torch.randn((1, *mean.shape[1:]), generator=g, dtype=mean.dtype)
            out.append(mean[j:j + 1] + std[j:j + 1] * eps)
        self.timings["vae_encode"] = self.timings.get("vae_encode", 0.0) + time.perf_counter() - t0
        return self.scaling * torch.cat(out)

    def start(self, sched, steps, backend, generators, latent_shape, device):
        timesteps = self.start_timesteps(sched, steps)
        init = self._encode(backend, self.prepared.index, self.prepared.images, generators).to(device)
        noise = torch.cat([torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
                           for g in generators]).to(device)
        t0 = timesteps[:1].repeat(len(generators))
        return timesteps, sched.add_noise(init, noise, t0)


class Inpaint(ImageToImage):
    """StableDiffusionInpaintPipeline, with a 9-channel inpainting UNet or an ordinary 4-channel one."""
    name = "inpaint"

    def __init__(self, prepared: _Prepared, strength: float, scaling: float, nine_channels: bool, guided: bool,
                 latent_channels: int = 4):
        super().__init__(prepared, strength, scaling, latent_channels)
        self.nine, self.guided = nine_channels, guided

    def start(self, sched, steps, backend, generators, latent_shape, device):
        p = self.prepared
        timesteps = self.start_timesteps(sched, steps)
        full = self.strength == 1.0
        # the RNG draws in diffusers' order per generator: [image encode], noise, masked-image encode
        image_latents = None
        if not self.nine or not full:
            image_latents = self._encode(backend, p.index, p.images, generators).to(device)
        noise = torch.cat([torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
                           for g in generators]).to(device)
        if full:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(len(generators)))
        h, w = latent_shape[1:]
        masks = torch.nn.functional.interpolate(p.masks, size=(h, w))  # nearest, as diffusers
        self.mask = masks[p.mask_index].to(device)
        if self.nine:
            pairs = list(zip(p.index, p.mask_index))
            distinct = sorted(set(pairs))
            masked = torch.stack([p.images[i] * (p.masks[m] < 0.5) for i, m in distinct])
            sel = [distinct.index(pair) for pair in pairs]
            masked_latents = self._encode(backend, sel, masked, generators).to(device)
            self.cond = torch.cat([self.mask, masked_latents], dim=1)
            if self.guided:
                self.cond = torch.cat([self.cond] * 2)
        else:
            # diffusers encodes the masked image here too but a 4-channel UNet never reads it: draw the
            # sample's noise only (a KL VAE's encoder samples; a tiny VAE's draws nothing), so the generators
            # (which ancestral schedulers read) stay in step
            for g in generators if self.sampled else ():
                torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
            self.image_latents, self.noise, self.timesteps = image_latents, noise, timesteps
        return timesteps, latents

    def unet_input(self, model_in):
        return torch.cat([model_in, self.cond.to(model_in.dtype)], dim=1) if self.nine else model_in

    def after_step(self, latents, i, timesteps, sched):
        if self.nine:
            return latents
        proper = self.image_latents
        if i < len(timesteps) - 1:
            proper = sched.add_noise(proper, self.noise, torch.tensor([timesteps[i + 1]]))
        return (1 - self.mask) * proper + self.mask * latents


def make_task(*, image, mask_image, strength, prompts: int, per_prompt: int, height: int, width: int,
              unet_in_channels: int, vae_scale_factor: int, scaling_factor: float, guided: bool,
              latent_channels: int = 4):
    """The task for one call; images already checked by `target_size` for (height, width)."""
    if image is None:
        return TextToImage()
    strength = strength_value(strength, mask_image is not None)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    items = _as_items(image, "image")
    try:
        images = processor.preprocess(items, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as e:
        raise InvalidParameter("image", type(items[0]).__name__, f"RGB images ({str(e).splitlines()[0][:120]})") from None
    prepared = _Prepared(images, _spread(len(items), "image", prompts, per_prompt))
    if mask_image is None:
        return ImageToImage(prepared, strength, scaling_factor, latent_channels)
    masks_in = _as_items(mask_image, "mask_image")
    mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    try:
        prepared.masks = mask_processor.preprocess(masks_in, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as e:
        raise InvalidParameter("mask_image", type(masks_in[0]).__name__,
                               f"grayscale or RGB images ({str(e).splitlines()[0][:120]})") from None
    prepared.mask_index = _spread(len(masks_in), "mask_image", prompts, per_prompt)
    return Inpaint(prepared, strength, scaling_factor, unet_in_channels == 9, guided, latent_channels)
