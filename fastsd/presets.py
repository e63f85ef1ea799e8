"""Model presets: the real architecture configs of the Stable Diffusion family, written out so any of
them can be built (with random weights) without a download."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InvalidParameter

SD_SCHEDULER = dict(  # the scheduler_config.json these checkpoints ship with
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)

_SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,  # diffusers' name: 8 heads (head dims 40/80/160)
)
_SD2_UNET = dict(_SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)  # heads of 64 channels each

_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)

_CLIP_L = dict(  # CLIP ViT-L/14 text tower (SD 1.x)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
_OPENCLIP_H = dict(  # OpenCLIP ViT-H/14 text tower, penultimate layer (SD 2.x ships 23 of 24 layers)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)
_X4_UNET = dict(  # stable-diffusion-x4-upscaler (x4-upscaling.yaml): 4 latent + 3 low-res image channels in,
    # noise_level as a class label, cross-attention only in the three attention levels, 8 heads
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    only_cross_attention=(True, True, True, False), num_class_embeds=1000, cross_attention_dim=1024,
    attention_head_dim=8, use_linear_projection=True,
)
_X4_VAE = dict(_SD_VAE, block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256, scaling_factor=0.08333)  # 4x, not 8x
_X4_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02)  # DDIM, v-prediction, over these betas
_X4_UPSCALER = dict(  # low_res_scheduler: noises the low-res image to noise_level; max_noise_level: model_index.json
    low_res_scheduler=dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                           clip_sample=False, variance_type="fixed_small"),
    max_noise_level=350)
_DPT_HYBRID = dict(  # the depth_estimator of stable-diffusion-2-depth: DPT-Hybrid (MiDaS 3.0), ViT-B/16 on a BiT stem
    is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    image_size=384, patch_size=16, backbone_out_indices=(2, 5, 8, 11), neck_hidden_sizes=(256, 512, 768, 768),
    fusion_hidden_size=256, readout_type="project", reassemble_factors=(4, 2, 1, 0.5),
    backbone_featmap_shape=(1, 1024, 24, 24), neck_ignore_stages=(0, 1),
)

_SAFETY_VIT_L = dict(  # the vision tower of StableDiffusionSafetyChecker (CLIP ViT-L/14)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768,
)


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None
    size: int  # native resolution in pixels
    prediction_type: str  # "epsilon" | "v_prediction"
    scheduler: str  # default scheduler name (see fastsd.schedulers)
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    safety_checker: dict[str, Any] | None = None  # CLIP vision config, or None when the model has none
    local_path: Path | None = None  # a folder shipped inside the package
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    scheduler_overrides: dict[str, Any] | None = None  # over SD_SCHEDULER (the x4 upscaler's betas)
    depth_estimator: dict[str, Any] | None = None  # DPTConfig of a depth model's estimator
    upscaler: dict[str, Any] | None = None  # an upscaler's low_res_scheduler config and max_noise_level

    def scheduler_config(self) -> dict[str, Any]:
        return dict(SD_SCHEDULER, prediction_type=self.prediction_type, **(self.scheduler_overrides or {}))


TINY = Preset(
    name="tiny", hub_id=None, size=64, prediction_type="epsilon", scheduler="pndm",
    unet=dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16,
    ),
    # four blocks, like SD's VAE, so a latent pixel is 8x8 image pixels here too
    vae=dict(_SD_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
             sample_size=64),
    text_encoder=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513),
    description="a few-MB model of the SD family with random weights, for tests",
)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("sd-1.4", "CompVis/stable-diffusion-v1-4", 512, "epsilon", "pndm", _SD1_UNET, _SD_VAE, _CLIP_L,
           _SAFETY_VIT_L, description="Stable Diffusion 1.4"),
    Preset("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, "epsilon", "pndm", _SD1_UNET,
           _SD_VAE, _CLIP_L, _SAFETY_VIT_L, description="Stable Diffusion 1.5",
           aliases=("runwayml/stable-diffusion-v1-5",)),
    Preset("sd-2.1", "stabilityai/stable-diffusion-2-1", 768, "v_prediction", "ddim",
           dict(_SD2_UNET, sample_size=96), dict(_SD_VAE, sample_size=768), _OPENCLIP_H,
           description="Stable Diffusion 2.1, 768x768, v-prediction"),
    Preset("sd-2-base", "stabilityai/stable-diffusion-2-base", 512, "epsilon", "pndm", _SD2_UNET, _SD_VAE,
           _OPENCLIP_H, description="Stable Diffusion 2 base, 512x512 (and its fine-tunes)"),
    Preset("small-sd", "OFA-Sys/small-stable-diffusion-v0", 512, "epsilon", "pndm",
           dict(_SD1_UNET, layers_per_block=1), _SD_VAE, _CLIP_L, _SAFETY_VIT_L,
           description="OFA-Sys small SD: the SD 1.4 architecture with one layer per block"),
    # inpainting checkpoints: the same architectures with a 9-channel UNet input (latents, mask, masked image)
    Preset("sd-1.5-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting", 512, "epsilon", "pndm",
           dict(_SD1_UNET, in_channels=9), _SD_VAE, _CLIP_L, _SAFETY_VIT_L,
           description="Stable Diffusion 1.5 inpainting (9-channel UNet)",
           aliases=("runwayml/stable-diffusion-inpainting",)),
    Preset("sd-2-inpainting", "stabilityai/stable-diffusion-2-inpainting", 512, "epsilon", "pndm",
           dict(_SD2_UNET, in_channels=9), _SD_VAE, _OPENCLIP_H,
           description="Stable Diffusion 2 inpainting, 512x512 (9-channel UNet)"),
    # the rest of the SD 2 family: depth-to-image (5-channel UNet + a DPT depth estimator) and the x4 upscaler
    Preset("sd-2-depth", "stabilityai/stable-diffusion-2-depth", 512, "epsilon", "pndm",
           dict(_SD2_UNET, in_channels=5), _SD_VAE, _OPENCLIP_H, depth_estimator=_DPT_HYBRID,
           description="Stable Diffusion 2 depth-to-image, 512x512 (5-channel UNet, DPT-Hybrid depth estimator)"),
    Preset("sd-x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler", 512, "v_prediction", "ddim", _X4_UNET,
           _X4_VAE, _OPENCLIP_H, scheduler_overrides=_X4_SCHEDULER, upscaler=_X4_UPSCALER,
           description="Stable Diffusion x4 upscaler: 128 -> 512 (7-channel UNet, noise_level, 4x VAE)"),
    TINY,
    replace(TINY, name="tiny-inpainting", unet=dict(TINY.unet, in_channels=9),
            description="the tiny model with a 9-channel inpainting UNet, for tests"),
    replace(TINY, name="tiny-depth", unet=dict(TINY.unet, in_channels=5),
            depth_estimator=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                                 image_size=32, patch_size=8, backbone_out_indices=(0, 1, 2, 3),
                                 neck_hidden_sizes=(8, 16, 32, 32), fusion_hidden_size=16),
            description="the tiny model with a 5-channel depth UNet and a tiny DPT, for tests"),
    replace(TINY, name="tiny-upscaler", prediction_type="v_prediction", scheduler="ddim",
            unet=dict(TINY.unet, in_channels=7, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=(True, False),
                      num_class_embeds=1000, use_linear_projection=True),
            vae=dict(TINY.vae, block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333),
            scheduler_overrides=_X4_SCHEDULER, upscaler=_X4_UPSCALER,
            description="the tiny model as an x4 upscaler (7-channel UNet, 4x VAE), 16 -> 64, for tests"),
]}


def get_preset(name: str) -> Preset | None:
    """The preset with this name, hub id or alias; None when nothing matches."""
    for p in PRESETS.values():
        if name == p.name or name == p.hub_id or name in p.aliases:
            return p
    return None


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


def check_config(model: str, config: str | None) -> None:
    """--config names the architecture of a single checkpoint file; beside anything else (a preset, a
    folder, a hub id, which carry their own) it would be ignored, so it is an error instead."""
    if config is None:
        return
    if get_preset(config) is None:
        raise InvalidParameter("config", config, "a preset name: " + ", ".join(PRESETS))
    if Path(model).suffix not in CHECKPOINT_SUFFIXES:
        raise InvalidParameter("config", config, f"only with --model set to a single checkpoint file "
                                                 f"({', '.join(CHECKPOINT_SUFFIXES)}); {model!r} carries its own "
                                                 "architecture")


PACKAGED_MODELS = Path(__file__).parent / "models"


def _packaged(name: str, description: str) -> Preset | None:
    """A model folder shipped inside the package, as a preset (its architecture read from its configs)."""
    import json
    folder = PACKAGED_MODELS / name
    if not (folder / "model_index.json").is_file():
        return None

    def cfg(part):
        return {k: v for k, v in json.loads((folder / part / "config.json").read_text()).items()
                if not k.startswith("_")}
    unet, vae = cfg("unet"), cfg("vae")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return Preset(name, None, int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1),
                  sched.get("prediction_type", "epsilon"), "pndm", unet, vae, cfg("text_encoder"),
                  local_path=folder, description=description)


_shapes = _packaged("fastsd-shapes", "a toy SD-family model trained here: flat shapes and colours (default)")
if _shapes is not None:
    PRESETS[_shapes.name] = _shapes
DEFAULT_MODEL = "fastsd-shapes" if _shapes is not None else "tiny"
