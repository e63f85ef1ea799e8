"""Where models come from: a preset with random weights, a hub id, a local diffusers folder, or a
single .safetensors checkpoint (original LDM layout). Everything ends as an `SDModel` in FP32 on CPU."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from .errors import ModelLoadError
from .model import SDModel
from .model_kinds import kind_of
from .presets import CHECKPOINT_SUFFIXES, PRESETS, Preset, check_config, get_preset
from .schedulers import make_scheduler
from .tiny_vae import use_tiny_vae
from .tokenizer import byte_level_clip_tokenizer

log = logging.getLogger("fastsd")

PACKAGED_MODELS = Path(__file__).parent / "models"


def build_random(preset: Preset, seed: int = 0, with_safety_checker: bool = True) -> SDModel:
    """The preset's full architecture with seeded random weights; costs what trained weights cost."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder)).eval()
    unet = UNet2DConditionModel.from_config(preset.unet).eval()
    vae = AutoencoderKL.from_config(preset.vae).eval()
    safety = fe = None
    if preset.safety_checker is not None and with_safety_checker:
        cfg = CLIPConfig(vision_config=CLIPVisionConfig(**preset.safety_checker).to_dict(),
                         projection_dim=preset.safety_checker["projection_dim"])
        safety = StableDiffusionSafetyChecker(cfg).eval()
        fe = CLIPImageProcessor()
    scheduler = make_scheduler(preset.scheduler, preset.scheduler_config())
    return SDModel(preset.name, "random", byte_level_clip_tokenizer(), text_encoder, unet, vae, scheduler,
                   safety, fe, preset=preset, extra=kind_parts(preset))


def kind_parts(preset: Preset) -> dict:
    """What a depth or upscale preset has beyond the SD components (SDModel.extra), with random weights."""
    extra = {}
    if preset.depth_estimator is not None:
        from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor
        cfg = DPTConfig(**preset.depth_estimator)
        extra["depth_estimator"] = DPTForDepthEstimation(cfg).eval()
        extra["depth_processor"] = DPTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
    if preset.upscaler is not None:
        from diffusers import DDPMScheduler
        extra["low_res_scheduler"] = DDPMScheduler.from_config(preset.upscaler["low_res_scheduler"])
        extra["max_noise_level"] = int(preset.upscaler["max_noise_level"])
    return extra


def _load_folder(path: Path, name: str, source: str, preset: Preset | None) -> SDModel:
    """Any SD-family folder (fastsd.model_kinds): loaded with the pipeline class its model_index.json names,
    which must agree with its UNet's input channels."""
    import diffusers
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model: {path} is not a diffusers model folder (no model_index.json)")
    try:
        index = json.loads((path / "model_index.json").read_text())
        class_name = index.get("_class_name") or "StableDiffusionPipeline"
        unet_config = path / "unet" / "config.json"
        channels = json.loads(unet_config.read_text()).get("in_channels", 4) if unet_config.is_file() else 4
        kind_of(channels, class_name, where=f"model: {path}")
        # no dtype keyword (diffusers renamed torch_dtype to dtype in 0.4x and warns on the old one):
        # load as saved, then make every module FP32 below
        loader = "StableDiffusionPipeline" if class_name == "LatentConsistencyModelPipeline" else class_name
        pipe = getattr(diffusers, loader).from_pretrained(str(path), local_files_only=True, use_safetensors=None)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers raises many types for a broken folder; say which file
        raise ModelLoadError(f"model: cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    modules = [m.to(torch.float32).eval() if m is not None else None
               for m in (pipe.text_encoder, pipe.unet, pipe.vae, getattr(pipe, "safety_checker", None))]
    extra, fe = {}, getattr(pipe, "feature_extractor", None)
    if class_name == "StableDiffusionDepth2ImgPipeline":
        estimator = pipe.depth_estimator
        extra = {"depth_estimator": estimator.to(torch.float32).eval() if estimator is not None else None,
                 "depth_processor": fe}
        fe = None  # the folder's feature extractor is DPT's, not a safety checker's
    elif class_name == "StableDiffusionUpscalePipeline":
        extra = {"low_res_scheduler": pipe.low_res_scheduler, "max_noise_level": int(pipe.config.max_noise_level)}
        fe = fe if modules[3] is not None else None
    return SDModel(name, source, pipe.tokenizer, modules[0], modules[1], modules[2], pipe.scheduler, modules[3],
                   fe, preset=preset, path=path, extra=extra)


def _load_hub(preset_or_id: str, preset: Preset | None) -> SDModel:
    from huggingface_hub import snapshot_download
    hub_id = preset.hub_id if preset else preset_or_id
    try:
        # never download implicitly: weights come from the local cache or not at all
        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception as e:
        hint = "; build it with --random-weights" if preset else ""
        raise ModelLoadError(
            f"model: {preset_or_id!r} ({hub_id}) is not in the local Hugging Face cache and fastsd does not "
            f"download weights implicitly; download it with `huggingface-cli download {hub_id}` or pass a "
            f"local folder{hint}") from e
    return _load_folder(Path(folder), preset.name if preset else hub_id, "hub", preset)


def load_model(spec: str, *, random_weights: bool = False, seed: int = 0, allow_pickle: bool = False,
               config: str | None = None, safety_checker: bool = True, vae_tiny: str | None = None) -> SDModel:
    """Load `spec`: a preset name, a hub id, a local diffusers folder or a single checkpoint file.

    random_weights: build the preset's architecture (spec must be a preset) with seeded weights.
    allow_pickle: allow `.ckpt` pickles (loaded with weights_only=True); off by default.
    config: for a single checkpoint file, the preset whose architecture it has (auto-detected if None).
    vae_tiny: a local AutoencoderTiny (TAESD) folder that decodes and encodes in place of the model's VAE.
    """
    model = _load(spec, random_weights=random_weights, seed=seed, allow_pickle=allow_pickle, config=config,
                  safety_checker=safety_checker)
    return use_tiny_vae(model, vae_tiny) if vae_tiny else model


def _load(spec: str, *, random_weights: bool, seed: int, allow_pickle: bool, config: str | None,
          safety_checker: bool) -> SDModel:
    check_config(spec, config)
    preset = get_preset(spec)
    path = Path(spec).expanduser()
    if random_weights:
        if preset is None:
            raise ModelLoadError(f"model: --random-weights needs a preset name; got {spec!r}; "
                                 f"presets: {', '.join(PRESETS)}")
        return build_random(preset, seed, with_safety_checker=safety_checker)
    if preset is not None and preset.local_path is not None:
        model = _load_folder(preset.local_path, preset.name, "packaged", preset)
    elif preset is not None and preset.hub_id is None:
        model = build_random(preset, seed, with_safety_checker=safety_checker)  # tiny: random by design
    elif path.is_dir():
        model = _load_folder(path, path.name, "folder", None)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"model: checkpoint file {path} does not exist")
        from .single_file import load_single_file  # the LDM key converters load only for a checkpoint file
        model = load_single_file(path, allow_pickle=allow_pickle, config=config)
    elif preset is not None or ("/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1):
        model = _load_hub(spec, preset)
    else:
        raise ModelLoadError(f"model: {spec!r} is neither a preset ({', '.join(PRESETS)}), an existing folder, "
                             f"a .safetensors file nor a hub id (owner/name)")
    if not safety_checker:
        model.safety_checker = None
    return model
