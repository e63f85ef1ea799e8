"""Tiled UNet calls for the x4 upscaler, whose latents have the input image's size: a 512x512 input means
512x512 latents, beyond what one UNet call holds in memory (its attention at 256x256 tokens). Every step the
UNet runs on overlapping windows of at most `size` x `size` latents; each window's prediction is weighted by a
ramp that rises linearly across the overlap on every side that has a neighbour (1 in the interior, 1 at the
image's border), and the weighted sum is divided by the sum of the weights, so the blend is seamless and the
weights need no tuning. Windows start on multiples of the UNet's downsampling factor, so each is a size the
UNet takes. An input within one window runs in one call, exactly as diffusers' pipeline does.

Defaults: windows of 128 latents (the upscaler's training size: a 128x128 input, a 512x512 output) overlapping
by 32."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InvalidParameter

DEFAULT_TILE = 128
MIN_TILE = 16


@dataclass(frozen=True)
class Tiling:
    size: int  # window side in latents (= input pixels)
    overlap: int
    multiple: int  # windows start on (and have sides of) multiples of this


def tiling(size, multiple: int) -> Tiling:
    """size: None (the default, 128) or an integer >= 16, a multiple of `multiple`; the overlap is a quarter."""
    if size is None:
        size = DEFAULT_TILE
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < MIN_TILE or size % multiple:
        raise InvalidParameter("tile_size", size, f"an integer >= {MIN_TILE}, a multiple of {multiple}: the side of "
                               "the windows the upscaler's UNet runs on, in input pixels (default 128)")
    overlap = max(multiple, size // 4 // multiple * multiple)
    return Tiling(int(size), overlap, multiple)


def starts(length: int, t: Tiling) -> list[int]:
    """Window starts along one axis: 0, ..., length - size, evenly spread with at least `overlap` shared."""
    if length <= t.size:
        return [0]
    n = math.ceil((length - t.size) / (t.size - t.overlap)) + 1
    last = length - t.size
    return sorted({min(last, round(i * last / (n - 1) / t.multiple) * t.multiple) for i in range(n)})


def _ramp(n: int, lead: int, trail: int) -> torch.Tensor:
    """1 in the middle; rising over `lead` values at the start and falling over `trail` at the end (never 0)."""
    w = torch.ones(n)
    if lead:
        w[:lead] = torch.arange(1, lead + 1) / (lead + 1)
    if trail:
        w[n - trail:] = torch.minimum(w[n - trail:], torch.arange(trail, 0, -1) / (trail + 1))
    return w


def run_tiled(unet: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, t: Tiling) -> torch.Tensor:
    """unet(x) over windows of x [B, C, H, W], blended; one call when x fits in one window."""
    h, w = x.shape[-2:]
    if h <= t.size and w <= t.size:
        return unet(x)
    ys, xs = starts(h, t), starts(w, t)
    out = weight = None
    for y in ys:
        for x0 in xs:
            th, tw = min(t.size, h), min(t.size, w)
            pred = unet(x[..., y:y + th, x0:x0 + tw])
            if out is None:
                out = torch.zeros((*pred.shape[:-2], h, w), dtype=pred.dtype, device=pred.device)
                weight = torch.zeros((h, w), dtype=pred.dtype, device=pred.device)
            wy = _ramp(th, t.overlap if y > 0 else 0, t.overlap if y + th < h else 0)
            wx = _ramp(tw, t.overlap if x0 > 0 else 0, t.overlap if x0 + tw < w else 0)
            win = (wy[:, None] * wx[None, :]).to(pred.device, pred.dtype)
            out[..., y:y + th, x0:x0 + tw] += pred * win
            weight[y:y + th, x0:x0 + tw] += win
    return out / weight
