"""A tiny VAE in place of a model's own: diffusers' `AutoencoderTiny`, the TAESD format (madebyollin/taesd for
SD 1.x/2.x: ~1M parameters per half against the full VAE's ~34M/50M), loaded from a local folder.

It decodes (and, for image-to-image and inpainting, encodes) with the model's UNet unchanged: the latents are
the same space, read directly (its config's scaling_factor is 1.0 and its encoder gives latents, not a
distribution to sample), as diffusers' pipelines do when a pipeline's `vae` is an AutoencoderTiny. `verify`
compares against diffusers' pipeline with the same tiny VAE; `fastsd export` writes it as the vae_decoder and
vae_encoder graphs."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from .errors import InvalidParameter, ModelLoadError


def is_tiny(vae) -> bool:
    """Whether `vae` (a module, or an export's graph stand-in with a .config) is an AutoencoderTiny."""
    if isinstance(vae, AutoencoderTiny):
        return True
    return getattr(getattr(vae, "config", None), "_class_name", None) == "AutoencoderTiny"


def load_tiny_vae(path) -> AutoencoderTiny:
    """An AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors) in FP32 on the CPU."""
    folder = Path(path).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise InvalidParameter("vae_tiny", str(path), "a folder holding an AutoencoderTiny (TAESD) config.json and "
                               "weights, e.g. a download of madebyollin/taesd")
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"vae_tiny: cannot read {config}: {e}") from None
    if cls != "AutoencoderTiny":
        raise InvalidParameter("vae_tiny", str(path), f"an AutoencoderTiny folder (this one holds a {cls})")
    try:
        vae = AutoencoderTiny.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelLoadError(f"vae_tiny: cannot load {folder}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    return vae.to(torch.float32).eval()


def use_tiny_vae(model, path):
    """`model` (an SDModel) with the tiny VAE at `path` in place of its own; checked to fit its UNet's latents."""
    vae = load_tiny_vae(path)
    want = int(model.unet.config.in_channels)
    channels = int(vae.config.latent_channels)
    if want != channels and want != 2 * channels + 1:  # 9 = latents + mask + masked-image latents
        raise InvalidParameter("vae_tiny", str(path), f"a tiny VAE with latents of {want if want != 9 else 4} "
                               f"channels, as this model's UNet reads (it has {channels})")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if scale != model.vae_scale_factor:
        raise InvalidParameter("vae_tiny", str(path), f"a tiny VAE that scales images by {model.vae_scale_factor} "
                               f"as this model's VAE does (it scales by {scale})")
    model.vae = vae
    model.extra = {**(model.extra or {}), "vae_tiny": str(Path(path).expanduser().resolve())}
    return model
