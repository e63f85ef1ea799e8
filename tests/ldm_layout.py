"""Test helper: write a diffusers model in the original LDM single-file layout (the inverse of diffusers'
single-file converters), so the single-file loader is tested on real key names without a download."""
import torch

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
VAE_RESNET = [("nin_shortcut", "conv_shortcut")]
VAE_ATTN = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def _sub(name: str, pairs, src_prefix: str, dst_prefix: str):
    rest = name[len(src_prefix):]
    for ldm, hf in pairs:
        if rest.startswith(hf + "."):
            return dst_prefix + ldm + rest[len(hf):]
    return dst_prefix + rest


def unet_to_ldm(unet) -> dict:
    cfg, lpb = unet.config, unet.config.layers_per_block
    prefixes = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2.", "class_embedding.": "label_emb."}
    for i in range(len(cfg.block_out_channels)):
        for j in range(lpb):
            n = i * (lpb + 1) + j + 1
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."
        has_attn = "CrossAttn" in cfg.up_block_types[i]
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}."
    out = {}
    for k, v in unet.state_dict().items():
        src = max((p for p in prefixes if k.startswith(p)), key=len)
        name = _sub(k, RESNET if ".resnets." in src or src.startswith("mid_block.resnets") else [], src,
                    prefixes[src])
        out["model.diffusion_model." + name] = v
    return out


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    out = {}
    for k, v in vae.state_dict().items():
        src = max((p for p in prefixes if k.startswith(p)), key=len, default="")
        name = _sub(k, VAE_ATTN if "attentions" in src else VAE_RESNET, src, prefixes.get(src, ""))
        if "attn_1." in name and v.ndim == 2:
            v = v[:, :, None, None]  # LDM keeps these projections as 1x1 convolutions
        out["first_stage_model." + name] = v
    return out


def to_ldm_checkpoint(model) -> dict:
    sd = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae)}
    for k, v in model.text_encoder.state_dict().items():
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {k: v.contiguous().clone() for k, v in sd.items()}
