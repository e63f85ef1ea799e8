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


def ip_adapter_state(unet, seed: int = 0) -> dict:
    """An IP-Adapter for `unet` with random weights, in the layout `unet._load_ip_adapter_weights` reads: an
    image projection to 4 tokens and to_k_ip/to_v_ip per cross-attention layer (no image encoder needed:
    the call passes `ip_adapter_image_embeds`)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    torch.manual_seed(seed)
    dim, channels = unet.config.cross_attention_dim, list(unet.config.block_out_channels)
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")
        hidden = channels[-1] if block[0] == "mid_block" else \
            channels[::-1][int(block[1])] if block[0] == "up_blocks" else channels[int(block[1])]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=dim, scale=1.0).state_dict()
        layers[f"{key}.to_k_ip.weight"], layers[f"{key}.to_v_ip.weight"] = sd["to_k_ip.0.weight"], sd["to_v_ip.0.weight"]
        key += 2
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    return {"image_proj": {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                           "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]},
            "ip_adapter": layers}


def image_embeds(dim: int = 32, seed: int = 3) -> list:
    """`ip_adapter_image_embeds` for one image with guidance: [negative, positive] stacked."""
    return [torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(seed))]
