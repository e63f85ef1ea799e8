"""`SDModel`: the components of one Stable Diffusion model, whatever they were loaded from.

Everything that loads a model (fastsd.loading, fastsd.single_file, the ONNX export's reader) ends in this
type; it depends on nothing of fastsd's, so every layer can hold one."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPImageProcessor, CLIPTextModel

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
    extra: dict = field(default_factory=dict)

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
        return parts

    def parameter_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.components().items()}

    def to_pipeline(self, with_safety_checker: bool = True, task: str = "text2img"):
        """diffusers' own pipeline over these very modules (the FP32 reference): StableDiffusionPipeline, or
        for task img2img / inpaint StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline."""
        import diffusers
        cls = {"text2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline}[task]
        sc = self.safety_checker if with_safety_checker else None
        return cls(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=sc, feature_extractor=self.feature_extractor,
            requires_safety_checker=False)
