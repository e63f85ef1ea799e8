"""The torch speed recipe, written once for the Engine's torch backend and for `fastsd.accelerate`: the dtype
each network computes in, and the attention kernels, fused ops and memory format put on its modules.

The engine moves its modules to `Precision`'s dtypes and calls `install`; accelerate converts a copy of each
of the user's modules and calls `install_module` on it (what `install` does per module). What they add on
top is their own (the engine: step caching, compile with weight freezing, CUDA graphs of its UNet call;
accelerate: wrapped calls that keep the user's modules as they are and the pipeline dtype-transparent)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastsd import kernels


@dataclass(frozen=True)
class Precision:
    """The dtype of each network under a config (OptimizeConfig) on a device."""
    denoiser: torch.dtype  # the UNet (and ControlNets)
    vae: torch.dtype
    text: torch.dtype  # the text encoder (and safety checker, image encoder)
    cpu_recipe: bool  # bf16 on the CPU, measured: text encoder fp32, UNet and VAE bf16 in channels_last


def precision(config, device: torch.device) -> Precision:
    dtype = config.torch_dtype
    # fp16 VAEs overflow into NaN at SD sizes (diffusers' force_upcast); keep the VAE in fp32 then.
    vae = torch.float32 if dtype == torch.float16 and config.upcast_vae else dtype
    # the CPU recipe: the text encoder is cheap, and its error would reach every step
    cpu_recipe = device.type == "cpu" and dtype == torch.bfloat16 and config.cpu_recipe
    return Precision(dtype, vae, torch.float32 if cpu_recipe else dtype, cpu_recipe)


@dataclass
class Installed:
    """What `install` put on the modules."""
    attention: str  # the attention backend chosen (kernels.install_attention)
    fused: list = field(default_factory=list)  # per denoiser: the fused ops applied to it
    channels_last: list = field(default_factory=list)  # the modules converted to channels_last


def channels_last(role: str, config, prec: Precision) -> bool:
    """Whether the recipe puts `role`'s module in channels_last: the denoisers with the flag or under the CPU
    recipe, the VAE under the CPU recipe (measured ~20% faster decode there)."""
    return prec.cpu_recipe or (role != "vae" and config.channels_last)


def install_module(module, role: str, config, device: torch.device, prec: Precision, *, attention: str,
                   fuse_qkv: bool, fused_with=None) -> tuple[str, list, bool]:
    """The recipe on one module (a denoiser or the VAE, already in its dtype): fastsd's attention kernels,
    the fused ops (`fused_with`: a VAE fused alongside a denoiser, in the denoiser's dtype), channels_last.
    Returns (the attention backend chosen, the fused ops applied, whether channels_last was applied)."""
    dtype = prec.vae if role == "vae" else prec.denoiser
    chosen = kernels.install_attention(module, attention, device=device, dtype=dtype)
    fused = (kernels.apply_fused_ops(module, fused_with, device, dtype, fuse_qkv=fuse_qkv)
             if config.fused_ops else [])
    cl = channels_last(role, config, prec)
    if cl:
        module.to(memory_format=torch.channels_last)
    return chosen, fused, cl


def install(denoisers: list, vae, config, device: torch.device, prec: Precision, *,
            fuse_qkv: bool) -> Installed:
    """The recipe on the engine's networks: attention kernels on the denoisers and the VAE, the fused ops
    (the first denoiser's with the VAE's), channels_last (install_module, per module).
    fuse_qkv: fold q/k/v into one GEMM where it helps (CUDA); False where adapters may be loaded later
    through diffusers (its LoRA loader targets to_q/to_k/to_v, which fused weights would bypass)."""
    done = Installed(kernels.choose_attention(config.attention, device, prec.denoiser))
    kernels.install_attention(vae, done.attention, device=device, dtype=prec.vae)
    for i, m in enumerate(denoisers):
        _, fused, cl = install_module(m, "unet", config, device, prec, attention=done.attention,
                                      fuse_qkv=fuse_qkv, fused_with=vae if i == 0 else None)
        done.fused.append(fused)
        if cl:
            done.channels_last.append(m)
    if channels_last("vae", config, prec):
        vae.to(memory_format=torch.channels_last)
        done.channels_last.append(vae)
    return done
