"""What kind of Stable Diffusion model a set of weights is, told from its UNet's input channels and, for a
diffusers folder, the pipeline class its model_index.json names.

    kind      UNet in_channels  diffusers pipeline (the FP32 reference)       inputs
    sd        4                 StableDiffusionPipeline (+ Img2Img, Inpaint)  prompt [, image [, mask]]
    inpaint   9                 StableDiffusionInpaintPipeline                 prompt, image, mask
    depth     5                 StableDiffusionDepth2ImgPipeline               prompt, image [, depth map]
    upscale   7                 StableDiffusionUpscalePipeline                 prompt, low-res image [, noise level]
"""
from __future__ import annotations

from .errors import ModelLoadError

KIND_BY_CHANNELS = {4: "sd", 9: "inpaint", 5: "depth", 7: "upscale"}

# every pipeline class of the SD family a folder may name, and the kinds of UNet it can hold
PIPELINE_KINDS = {
    "StableDiffusionPipeline": ("sd", "inpaint"),
    "StableDiffusionImg2ImgPipeline": ("sd", "inpaint"),
    "StableDiffusionInpaintPipeline": ("sd", "inpaint"),  # a 4-channel UNet: the legacy (masked img2img) way
    "StableDiffusionDepth2ImgPipeline": ("depth",),
    "StableDiffusionUpscalePipeline": ("upscale",),
    # an LCM-distilled folder (e.g. SimianLuo/LCM_Dreamshaper_v7): the same components, which
    # StableDiffusionPipeline runs the same way (its UNet takes the guidance embedding)
    "LatentConsistencyModelPipeline": ("sd",),
}
# the class a folder of each kind is loaded with (and the reference `verify` runs)
PIPELINE_OF_KIND = {"sd": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline",
                    "depth": "StableDiffusionDepth2ImgPipeline", "upscale": "StableDiffusionUpscalePipeline"}


def kind_of(in_channels: int, class_name: str | None = None, where: str = "model") -> str:
    """The kind of a UNet with `in_channels` inputs, checked against the pipeline class a folder names."""
    kind = KIND_BY_CHANNELS.get(int(in_channels))
    if kind is None:
        raise ModelLoadError(f"{where}: its UNet takes {in_channels} input channels; fastsd runs 4 (text-to-image), "
                             "9 (inpainting), 5 (depth-to-image) and 7 (x4 upscaler)")
    if class_name is not None:
        if class_name not in PIPELINE_KINDS:
            raise ModelLoadError(f"{where}: holds a {class_name}; fastsd loads the SD family: "
                                 f"{', '.join(PIPELINE_KINDS)}")
        if kind not in PIPELINE_KINDS[class_name]:
            raise ModelLoadError(f"{where}: names {class_name} but its UNet takes {in_channels} input channels "
                                 f"(a {PIPELINE_OF_KIND[kind]} model)")
    return kind
