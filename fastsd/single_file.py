"""One-file checkpoints in the original (LDM / CompVis) layout, as the SD releases ship them.

diffusers' `from_single_file` fetches configs from the hub; our presets already hold the configs, so we
use only diffusers' key converters and build the modules from the preset."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .model import SDModel
from .model_kinds import kind_of
from .presets import PRESETS, get_preset
from .schedulers import make_scheduler
from .tokenizer import byte_level_clip_tokenizer

_UNET_PREFIX = "model.diffusion_model."
_V2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"model: {path} is not a readable .safetensors file ({e})") from e
    if not allow_pickle:
        raise ModelLoadError(f"model: {path} is a pickle checkpoint; pickles can run code when loaded, so they "
                             f"load only with --allow-pickle (and then with weights_only=True); prefer .safetensors")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"model: cannot read checkpoint {path} with weights_only=True ({e})") from e
    return sd.get("state_dict", sd)


def detect_preset(sd: dict[str, torch.Tensor]) -> str:
    """The preset whose architecture these weights have: the kind by the UNet's input channels
    (fastsd.model_kinds), SD 2 by its 1024-wide cross-attention, small-SD by its count of UNet input blocks."""
    if not any(k.startswith(_UNET_PREFIX) for k in sd):
        raise ModelLoadError("model: the checkpoint has no 'model.diffusion_model.*' weights; "
                             "it is not a Stable Diffusion checkpoint in the original layout")
    kind = kind_of(sd[_CONV_IN].shape[1], where="model: the checkpoint") if _CONV_IN in sd else "sd"
    v2 = any(k.endswith("attn2.to_k.weight") and k.startswith(_UNET_PREFIX) and v.shape[-1] == 1024
             for k, v in sd.items())
    if kind != "sd":
        return {"inpaint": "sd-2-inpainting" if v2 else "sd-1.5-inpainting", "depth": "sd-2-depth",
                "upscale": "sd-x4-upscaler"}[kind]
    if _V2_KEY in sd and sd[_V2_KEY].shape[-1] == 1024:
        return "sd-2-base"
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith(_UNET_PREFIX + "input_blocks.")}
    return "small-sd" if len(blocks) == 8 else "sd-1.5"


def load_single_file(path: Path, allow_pickle: bool = False, config: str | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = read_state_dict(path, allow_pickle)
    name = config or detect_preset(sd)
    preset = get_preset(name)
    if preset is None:
        raise ModelLoadError(f"config: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        with torch.device("meta"):  # no time spent on random init that the checkpoint replaces
            unet = UNet2DConditionModel.from_config(preset.unet)
            vae = AutoencoderKL.from_config(preset.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))  # has non-persistent buffers
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config), strict=True, assign=True)
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config), strict=True, assign=True)
        if preset.text_encoder["hidden_size"] == 1024:
            te_sd = convert_open_clip_checkpoint(text_encoder, sd)
        else:
            te_sd = convert_ldm_clip_checkpoint(sd)
        # transformers 5 names CLIPTextModel weights without the "text_model." prefix that 4.x used
        want_prefix = next(iter(text_encoder.state_dict())).startswith("text_model.")
        te_sd = {(k if want_prefix or not k.startswith("text_model.") else k[len("text_model."):]): v
                 for k, v in te_sd.items() if not k.endswith("position_ids")}
        missing, unexpected = text_encoder.load_state_dict(te_sd, strict=False, assign=True)
        if [k for k in missing if "position_ids" not in k]:
            raise RuntimeError(f"missing text encoder weights: {missing[:3]}")
    except Exception as e:
        raise ModelLoadError(f"model: {path} does not match the {preset.name} architecture "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass --config PRESET") from e
    # Tokenizer and scheduler are not in the file: take the preset's (its scheduler, a byte-level CLIP
    # vocabulary; put the checkpoint in a diffusers folder to use its real tokenizer).
    # an upscaler's noise schedule for its low-res input comes from the preset; a depth model's estimator is not
    # read from the file: pass --depth-map (or use the diffusers folder, which has it)
    extra = {}
    if preset.upscaler is not None:
        from diffusers import DDPMScheduler
        extra = {"low_res_scheduler": DDPMScheduler.from_config(preset.upscaler["low_res_scheduler"]),
                 "max_noise_level": int(preset.upscaler["max_noise_level"])}
    return SDModel(path.stem, "single-file", byte_level_clip_tokenizer(), text_encoder.eval(), unet.eval(),
                   vae.eval(), make_scheduler(preset.scheduler, preset.scheduler_config()), preset=preset,
                   path=path, extra=extra)
