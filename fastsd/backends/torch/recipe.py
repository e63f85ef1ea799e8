"""The torch speed recipe, written once for the Engine's torch backend and for `fastsd.accelerate`: the dtype
each network computes in, and the attention kernels, fused ops and memory format put on its modules.

Both callers move their modules to `Precision`'s dtypes and then call `install`; what they add on top is
their own (the engine: step caching, compile with weight freezing, CUDA graphs of its UNet call; accelerate:
wrapped forwards that keep a user's pipeline dtype-transparent)."""
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


def install(denoisers: list, vae, config, device: torch.device, prec: Precision, *,
            fuse_qkv: bool) -> Installed:
    """Attention kernels on the denoisers and the VAE, the fused ops (the first denoiser's with the VAE's),
    and channels_last (the denoisers; the VAE too under the CPU recipe, measured ~20% faster decode there).
    fuse_qkv: fold q/k/v into one GEMM where it helps (CUDA); False where adapters may be loaded later
    through diffusers (its LoRA loader targets to_q/to_k/to_v, which fused weights would bypass)."""
    target = denoisers[0] if len(denoisers) == 1 else denoisers
    done = Installed(kernels.install_attention(target, config.attention, device=device, dtype=prec.denoiser))
    kernels.install_attention(vae, done.attention, device=device, dtype=prec.vae)
    if config.fused_ops:
        done.fused = [kernels.apply_fused_ops(m, vae if i == 0 else None, device, prec.denoiser, fuse_qkv=fuse_qkv)
                      for i, m in enumerate(denoisers)]
    if config.channels_last or prec.cpu_recipe:
        done.channels_last = list(denoisers) + ([vae] if prec.cpu_recipe else [])
        for m in done.channels_last:
            m.to(memory_format=torch.channels_last)
    return done
