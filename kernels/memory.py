"""Memory planning: decide attention slicing and VAE tiling from an estimate of peak memory.

The estimates are deliberately simple and conservative (they are for deciding, not for accounting):

- UNet attention: the largest (batch, heads, queries, keys) score matrix over the attention levels,
  counted twice (scores and softmax output live together in a non-fused implementation), at the
  element size of the compute dtype (fp32 when attention is upcast). Backends that never materialise
  the matrix (`flash_backend=True`: triton, xformers, CUDA sdpa) count one BLOCK-sized tile only.
- UNet activations besides attention: a few feature maps at the first level,
  `unet_batch * block_out_channels[0] * h * w * bytes * 6`.
- VAE decode: the largest decoder feature map (channels at full resolution, including the upsampler
  input), times 3 (input, output, a norm/conv temporary), plus the mid-block attention score matrix
  (one head over (H/8 * W/8) tokens) counted twice. With tiling, the same at the tile size.

Model weights are not included; pass `weights_bytes` to add them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .device_guard import as_device
from .processor import attention_modules, installed_processors

logger = logging.getLogger("fastsd.kernels")

_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


@dataclass(frozen=True)
class MemoryPlan:
    attention_slicing: Union[bool, int]  # False, True (diffusers "auto": heads // 2) or a slice size
    vae_tiling: bool
    estimated_peak_bytes: int
    reason: str
    budget_bytes: Optional[int] = None
    unet_attention_bytes: int = 0
    vae_decode_bytes: int = 0


def _cfg(config: Any, key: str, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except TypeError:
            pass
    return getattr(config, key, default)


def _as_list(value, n):
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def available_memory_bytes(device) -> tuple[int, str]:
    """Free memory on `device`: torch.cuda.mem_get_info on CUDA, MemAvailable from /proc/meminfo on CPU."""
    device = as_device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"CUDA free memory {_mib(free)} of {_mib(total)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
                    return kib * 1024, f"MemAvailable {_mib(kib * 1024)} (/proc/meminfo)"
    except OSError:
        pass
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
        return avail, f"available RAM {_mib(avail)} (psutil)"
    except ImportError:
        return 8 * 2**30, "free RAM unknown (no /proc/meminfo, no psutil): assuming 8 GiB"


def unet_attention_levels(unet_config, height: int, width: int, vae_scale_factor: int = 8) -> list[dict]:
    """[{level, heads, tokens}] for each UNet level with transformer attention."""
    down = list(_cfg(unet_config, "down_block_types", ()) or ())
    n = len(down) or 1
    heads = _cfg(unet_config, "num_attention_heads", None) or _cfg(unet_config, "attention_head_dim", 8)
    heads = _as_list(heads, n)
    lh, lw = height // vae_scale_factor, width // vae_scale_factor
    levels = []
    for i, kind in enumerate(down):
        if "CrossAttn" in kind or "Attn" in kind:
            levels.append({"level": i, "heads": int(heads[i]), "tokens": (lh >> i) * (lw >> i)})
    mid = _cfg(unet_config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "Attn" in str(mid) and down:
        i = len(down) - 1
        levels.append({"level": "mid", "heads": int(heads[-1]), "tokens": (lh >> i) * (lw >> i)})
    return levels


def _vae_decode_bytes(vae_config, batch, height, width, nbytes) -> int:
    chans = list(_cfg(vae_config, "block_out_channels", (128, 256, 512, 512)) or (128, 256, 512, 512))
    rev = list(reversed(chans))
    n = len(rev)
    feature = 0
    for i, c in enumerate(rev):  # decoder up block i runs at height / 2^(n-1-i)
        scale = 2 ** (n - 1 - i)
        area = (height // scale) * (width // scale)
        feature = max(feature, c * area)
        if i < n - 1:  # its upsampler convolves c channels at the next resolution
            feature = max(feature, c * area * 4)
    tokens = (height // 2 ** (n - 1)) * (width // 2 ** (n - 1))
    attention = 2 * tokens * tokens * nbytes
    return batch * (3 * feature * nbytes + attention)


def plan_memory(unet_config, vae_config, batch: int, height: int, width: int, dtype, device,
                budget_bytes: Optional[int] = None, *, cfg_batch_factor: int = 2, upcast: Optional[bool] = None,
                flash_backend: bool = False, weights_bytes: int = 0, headroom: float = 0.9) -> MemoryPlan:
    """Plan attention slicing and VAE tiling for `batch` images of height x width pixels.

    batch: images per call; the UNet sees batch * cfg_batch_factor (2 with classifier-free guidance).
    budget_bytes: defaults to `headroom` x the free memory of `device`.
    upcast: attention scores in fp32 (default: on for fp16, as install_attention does).
    flash_backend: the attention backend never materialises the score matrix (triton, xformers,
        sdpa on CUDA): slicing is then not needed for attention.
    """
    device = as_device(device)
    nbytes = _DTYPE_BYTES.get(dtype, 4)
    if budget_bytes is None:
        free, source = available_memory_bytes(device)
        budget_bytes = int(free * headroom)
        budget_src = f"{headroom:.0%} of {source}"
    else:
        budget_src = "given budget"
    budget_bytes = int(budget_bytes)
    if upcast is None:
        upcast = dtype == torch.float16
    score_bytes = 4 if upcast else nbytes
    unet_batch = batch * max(1, cfg_batch_factor)

    levels = unet_attention_levels(unet_config, height, width)
    biggest = max(levels, key=lambda lv: lv["heads"] * lv["tokens"] ** 2, default=None)
    min_heads = min((lv["heads"] for lv in levels), default=1)
    chans = _as_list(_cfg(unet_config, "block_out_channels", (320, 640, 1280, 1280)), 1)
    lh, lw = height // 8, width // 8
    unet_act = unet_batch * int(chans[0]) * lh * lw * nbytes * 6
    if biggest is None:
        per_row = 0
    elif flash_backend:
        per_row = 128 * biggest["tokens"] * 4  # one query tile of fp32 scores at most
    else:
        per_row = 2 * biggest["tokens"] ** 2 * score_bytes  # one (batch*head) row of scores + probs
    rows = unet_batch * (biggest["heads"] if biggest else 0)
    attn_full = per_row * rows

    vae_full = _vae_decode_bytes(vae_config, batch, height, width, nbytes)
    tile = int(_cfg(vae_config, "sample_size", 512) or 512)
    if isinstance(tile, (list, tuple)):
        tile = int(tile[0])
    vae_tiled = _vae_decode_bytes(vae_config, batch, min(height, tile), min(width, tile), nbytes)

    reasons = [f"budget {_mib(budget_bytes)} ({budget_src})"]
    slicing: Union[bool, int] = False
    attn_used = attn_full
    if attn_full + unet_act + weights_bytes > budget_bytes and per_row > 0:
        room = budget_bytes - unet_act - weights_bytes
        fit_rows = room // per_row if room > 0 else 0
        slicing = int(max(1, min(min_heads, fit_rows)))
        attn_used = per_row * slicing
        reasons.append(
            f"attention scores {_mib(attn_full)} ({rows} batch*head rows x {biggest['tokens']} tokens^2 x "
            f"{score_bytes} B x2) do not fit: slicing to {slicing} rows per call ({_mib(attn_used)})")
        if attn_used + unet_act + weights_bytes > budget_bytes:
            reasons.append("even one row per call may not fit: lower the resolution or batch")
    else:
        reasons.append(f"attention scores {_mib(attn_full)} fit: no slicing")

    tiling = False
    vae_used = vae_full
    if vae_full + weights_bytes > budget_bytes:
        if height > tile or width > tile:
            tiling = True
            vae_used = vae_tiled
            reasons.append(f"VAE decode ~{_mib(vae_full)} does not fit: tiling ({tile}px tiles, ~{_mib(vae_tiled)})")
        else:
            reasons.append(f"VAE decode ~{_mib(vae_full)} does not fit but the image is within one {tile}px "
                           f"tile: tiling cannot help, decode fewer images at a time")
    else:
        reasons.append(f"VAE decode ~{_mib(vae_full)} fits: no tiling")

    peak = weights_bytes + max(attn_used + unet_act, vae_used)
    plan = MemoryPlan(slicing, tiling, int(peak), "; ".join(reasons), budget_bytes, int(attn_full), int(vae_full))
    logger.debug("memory plan for %dx%d batch %d %s on %s: slicing=%s tiling=%s peak~%s (%s)", width, height,
                batch, str(dtype).replace("torch.", ""), device, slicing, tiling, _mib(peak), plan.reason)
    return plan


def apply_memory_plan(unet, vae, plan: MemoryPlan) -> list[str]:
    """Apply a MemoryPlan. Returns what was done.

    Attention slicing: when FastSDAttnProcessor is installed in the UNet, its slice_size is set (diffusers'
    set_attention_slice would replace it with SlicedAttnProcessor, dropping the chosen backend); otherwise
    diffusers' `unet.set_attention_slice`. A plan without slicing leaves processors alone (diffusers'
    set_attention_slice(None) would reinstall its default processor).
    VAE tiling: `vae.enable_tiling()` when planned; a plan without tiling leaves the VAE alone.
    """
    done = []
    if plan.attention_slicing and unet is not None:
        ours = installed_processors(unet)
        if ours:
            if plan.attention_slicing is True:
                heads = [m.heads for m in attention_modules(unet)] or [2]
                size = max(1, min(heads) // 2)
            else:
                size = int(plan.attention_slicing)
            for p in ours:
                p.set_slice_size(size)
            done.append(f"attention slicing {size} (FastSDAttnProcessor)")
        else:
            size = "auto" if plan.attention_slicing is True else int(plan.attention_slicing)
            unet.set_attention_slice(size)
            done.append(f"attention slicing {size} (diffusers)")
    if plan.vae_tiling and vae is not None:
        vae.enable_tiling()
        done.append("vae tiling")
    return done
