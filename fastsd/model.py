"""`SDModel`: the components of one Stable Diffusion model, whatever they were loaded from.

Everything that loads a model (fastsd.loading, fastsd.single_file, the ONNX export's reader) ends in this
type; it depends only on fastsd's presets and model kinds, so every layer can hold one."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPImageProcessor, CLIPTextModel

from .model_kinds import kind_of
from .presets import Preset


@dataclass
class SDModel:
    """The components of one Stable Diffusion model, as diffusers and transformers objects."""
    name: str
    source: str  # "random" | "hub" | "folder" | "single-file"
    tokenizer: object
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: SchedulerMixin
    safety_checker: StableDiffusionSafetyChecker | None = None
    feature_extractor: CLIPImageProcessor | None = None
    preset: Preset | None = None
    path: Path | None = None  # the folder it came from, when it came from one
    # what a kind needs beyond the SD components: depth "depth_estimator" and "depth_processor" (DPT, optional);
    # upscale "low_res_scheduler" (DDPMScheduler) and "max_noise_level"
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """sd | inpaint | depth | upscale, from the UNet's input channels (fastsd.model_kinds)."""
        return kind_of(self.unet.config.in_channels, where=self.name)

    @property
    def native_size(self) -> int:
        if self.preset is not None:
            return self.preset.size
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        if self.safety_checker is not None:
            parts["safety_checker"] = self.safety_checker
        if self.extra.get("depth_estimator") is not None:
            parts["depth_estimator"] = self.extra["depth_estimator"]
        return parts

    def parameter_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.components().items()}

    def to_pipeline(self, with_safety_checker: bool = True, task: str = "text2img"):
        """diffusers' own pipeline over these very modules (the FP32 reference): StableDiffusionPipeline, or
        for task img2img / inpaint StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline, for a depth
        or upscale model StableDiffusionDepth2ImgPipeline / StableDiffusionUpscalePipeline (whatever `task`)."""
        import diffusers
        common = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                      scheduler=self.scheduler)
        if self.kind == "depth":
            return diffusers.StableDiffusionDepth2ImgPipeline(
                **common, depth_estimator=self.extra.get("depth_estimator"),
                feature_extractor=self.extra.get("depth_processor"))
        if self.kind == "upscale":
            return diffusers.StableDiffusionUpscalePipeline(
                **common, low_res_scheduler=self.extra["low_res_scheduler"],
                max_noise_level=int(self.extra.get("max_noise_level", 350)))
        cls = {"text2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline}[task]
        sc = self.safety_checker if with_safety_checker else None
        return cls(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=sc, feature_extractor=self.feature_extractor,
            requires_safety_checker=False)
