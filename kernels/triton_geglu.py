"""Fused GEGLU activation in Triton (imported lazily: importing this imports triton).

The SD transformer feed-forward projects to 2*F features and returns `a * gelu(gate)` where
`a, gate = proj.chunk(2, dim=-1)`. torch runs gelu and the multiply as two kernels with an F-wide
intermediate; this kernel reads both halves once and writes the product once (exact, erf-based gelu,
computed in fp32). It does not fuse into the projection GEMM itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_device
from .triton_mode import is_interpreted


@triton.jit
def _geglu_fwd(X, Y, n_rows, F, stride_xr, stride_yr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_f = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F)
    row_off = rows.to(tl.int64)[:, None]
    a = tl.load(X + row_off * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row_off * stride_xr + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    tl.store(Y + row_off * stride_yr + cols[None, :], (a * gelu).to(Y.dtype.element_ty), mask=mask)


INTERPRETED: bool = is_interpreted(_geglu_fwd)  # fixed when triton.jit decorated it


def geglu(x: torch.Tensor) -> torch.Tensor:
    """x[..., :F] * gelu(x[..., F:]) for x of last dim 2F."""
    two_f = x.shape[-1]
    if two_f % 2:
        raise ValueError(f"GEGLU needs an even last dim, got {two_f}")
    f = two_f // 2
    x2 = x.reshape(-1, two_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, f), device=x.device, dtype=x.dtype)
    if rows and f:
        if INTERPRETED:
            block_r, block_f = 32, min(256, triton.next_power_of_2(f))
        else:
            block_r, block_f = 4, min(1024, triton.next_power_of_2(f))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(f, block_f))
        with on_device(x.device):  # Triton launches on the current device: make it x's
            _geglu_fwd[grid](x2, y, rows, f, x2.stride(0), y.stride(0), BLOCK_R=block_r, BLOCK_F=block_f)
    return y.reshape(*x.shape[:-1], f)
