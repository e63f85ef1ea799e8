"""Fused GroupNorm + SiLU in Triton (imported lazily: importing this imports triton).

ResNet blocks in the SD UNet and VAE do `silu(group_norm(x))`. torch runs that as two kernels with a
full-size intermediate in between; this kernel reads x, computes the group statistics in fp32, and
writes silu(normalised * weight + bias) once.

A group of a contiguous NCHW tensor is one contiguous run of (C / G) * H * W elements: a "row". One
program handles ROWS rows (one on a GPU for SD-sized groups; many under the interpreter, where each
program costs milliseconds), walking them in BLOCK-sized chunks: pass 1 sums for the mean, pass 2 sums squared
deviations for the variance (two-pass, so no E[x^2] - E[x]^2 cancellation), pass 3 writes the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_device
from .triton_mode import is_interpreted


@triton.jit
def _groupnorm_silu_fwd(
    X, Y, W, B,
    n_rows,  # N * G: one row per (sample, group)
    group_size,  # (C / G) * HW elements, contiguous in an NCHW tensor
    HW, C, G, eps,
    APPLY_SILU: tl.constexpr, HAS_AFFINE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    g = rows % G
    cpg = C // G
    base = rows.to(tl.int64) * group_size
    offs = tl.arange(0, BLOCK)

    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        acc += tl.load(X + base[:, None] + idx[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 1) / group_size

    acc2 = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        x = tl.load(X + base[:, None] + idx[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        acc2 += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, 1) / group_size + eps)

    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        x = tl.load(X + base[:, None] + idx[None, :], mask=m, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_AFFINE:
            c = g[:, None] * cpg + idx[None, :] // HW
            w = tl.load(W + c, mask=m, other=1.0).to(tl.float32)
            b = tl.load(B + c, mask=m, other=0.0).to(tl.float32)
            y = y * w + b
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + base[:, None] + idx[None, :], y.to(Y.dtype.element_ty), mask=m)


INTERPRETED: bool = is_interpreted(_groupnorm_silu_fwd)  # fixed when triton.jit decorated it


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) for a (N, C, *spatial) tensor; makes x contiguous if it is not."""
    if x.dim() < 2:
        raise ValueError(f"group norm needs (N, C, ...) input, got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    x = x.contiguous()
    hw = x.numel() // (N * C) if N * C else 0
    y = torch.empty_like(x)
    group_size = (C // num_groups) * hw
    n_rows = N * num_groups
    if group_size == 0:
        return y
    has_affine = weight is not None and bias is not None
    if INTERPRETED:
        # The interpreter pays ~5 ms per program: pack many (sample, group) rows into one program.
        block = min(4096, triton.next_power_of_2(group_size))
        rows = max(1, min(triton.next_power_of_2(n_rows), 16384 // block))
        num_warps = 4
    else:
        # GPU: one row per program for SD-sized groups (10k-160k elements), a few for small ones.
        block = min(2048, max(128, triton.next_power_of_2(group_size)))
        rows = max(1, min(8, 2048 // triton.next_power_of_2(group_size)))
        num_warps = 8 if rows * block >= 2048 else 4
    w = weight if has_affine else x
    b = bias if has_affine else x
    grid = (triton.cdiv(n_rows, rows),)
    with on_device(x.device):  # Triton launches on the current device: make it x's
        _groupnorm_silu_fwd[grid](
            x, y, w, b, n_rows, group_size, hw, C, num_groups, float(eps),
            APPLY_SILU=silu, HAS_AFFINE=has_affine, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )
    return y
