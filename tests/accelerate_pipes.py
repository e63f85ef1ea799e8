"""Tiny diffusers pipelines built from configs (as diffusers' own fast tests build them), and their
inputs, for the fastsd.accelerate tests: text-to-image, image-to-image, inpainting (a 9-channel UNet) and
ControlNet (a random-weight ControlNetModel whose zero convolutions are given weights, so its residuals
reach the UNet)."""
import copy

import numpy as np
import torch
from PIL import Image

KINDS = ("txt2img", "img2img", "inpaint", "controlnet")


def tiny_parts():
    from diffusers import ControlNetModel, UNet2DConditionModel

    from fastsd.loading import build_random
    from fastsd.presets import TINY
    model = build_random(TINY, seed=0, with_safety_checker=False)
    torch.manual_seed(1)
    inpaint_unet = UNet2DConditionModel.from_config({**TINY.unet, "in_channels": 9}).eval()
    torch.manual_seed(2)
    controlnet = ControlNetModel(in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=2, norm_num_groups=16,
                                 conditioning_embedding_out_channels=(16, 16, 16, 16)).eval()
    with torch.no_grad():  # zero-initialised by design; random here so that the residuals matter
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    return {"model": model, "inpaint_unet": inpaint_unet, "controlnet": controlnet}


def make_pipe(parts, kind: str):
    import diffusers
    m = parts["model"]
    common = dict(vae=copy.deepcopy(m.vae), text_encoder=copy.deepcopy(m.text_encoder), tokenizer=m.tokenizer,
                  unet=copy.deepcopy(m.unet), scheduler=copy.deepcopy(m.scheduler), safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    if kind == "txt2img":
        pipe = diffusers.StableDiffusionPipeline(**common)
    elif kind == "img2img":
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**common)
    elif kind == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**{**common, "unet": copy.deepcopy(parts["inpaint_unet"])})
    elif kind == "controlnet":
        pipe = diffusers.StableDiffusionControlNetPipeline(**common, controlnet=copy.deepcopy(parts["controlnet"]))
    else:
        raise ValueError(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        return Image.fromarray(mask, "L")
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")


def call_kwargs(kind: str, steps: int = 2) -> dict:
    """The pipeline's own arguments for one small call of `kind`."""
    kw = {"prompt": "a red circle", "negative_prompt": "blue", "num_inference_steps": steps, "guidance_scale": 7.5}
    if kind == "txt2img":
        kw.update(height=64, width=64)
    elif kind == "img2img":
        kw.update(image=_image(3), strength=1.0)
    elif kind == "inpaint":
        kw.update(image=_image(3), mask_image=_image(0, "L"), height=64, width=64, strength=1.0)
    elif kind == "controlnet":
        kw.update(image=_image(4), height=64, width=64)
    return kw


def run(pipe, kind: str, seed: int = 0, **extra):
    """(images as float32 numpy, latents the step callback saw at each step)"""
    steps = []

    def keep(p, i, t, kw):
        steps.append(kw["latents"].detach().float().clone())
        return kw
    out = pipe(**{**call_kwargs(kind), "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np",
                  "callback_on_step_end": keep, **extra})
    return out.images, steps


def save_random_lora(parts, folder) -> None:
    """A rank-4 LoRA with random (not zero) weights for the tiny UNet's attention, written the diffusers way
    (needs peft)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = copy.deepcopy(parts["model"].unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
