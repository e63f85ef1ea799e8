"""Fused GroupNorm + SiLU in Triton (imported lazily: importing this imports triton).

ResNet blocks in the SD UNet and VAE do `silu(group_norm(x))`. torch runs that as two kernels with a
full-size intermediate in between; this kernel reads x, computes the group statistics in fp32, and
writes silu(normalised * weight + bias) once.

A "row" is one (sample, group): (C / G) * H * W elements. In a contiguous NCHW tensor a row is one
contiguous run; in a channels_last (NHWC) tensor it is C / G channels at each of the H * W positions, one
short contiguous run every C elements. The kernel takes both layouts (CHANNELS_LAST) and writes the output
in the input's layout, so a channels_last UNet keeps the fused kernel (it used to fall back to torch while
the log said triton). Any other strided input is made contiguous first.

One program handles ROWS rows, walking them in BLOCK-sized chunks: pass 1 sums for the mean, pass 2 sums
squared deviations for the variance (two-pass, so no E[x^2] - E[x]^2 cancellation), pass 3 writes the
output. How many rows a program takes is chosen per shape (`launch_plan`): one per program launched
N * G programs whatever N was, tiny ones for a large batch of small groups; the plan packs rows so that
the grid is a few programs per SM, within a tile of at most 8192 fp32 accumulators per program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device_guard import on_device
from .triton_mode import is_interpreted


@triton.jit
def _groupnorm_silu_fwd(
    X, Y, W, B,
    n_rows,  # N * G: one row per (sample, group)
    group_size,  # (C / G) * HW elements
    HW, C, G, eps,
    APPLY_SILU: tl.constexpr, HAS_AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    g = rows % G
    cpg = C // G
    if CHANNELS_LAST:  # element i of a row: position i // cpg, channel g * cpg + i % cpg
        base = (rows // G).to(tl.int64) * C * HW + g * cpg
    else:  # element i of a row: base + i
        base = rows.to(tl.int64) * group_size
    offs = tl.arange(0, BLOCK)

    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        if CHANNELS_LAST:
            off = (idx // cpg).to(tl.int64) * C + idx % cpg
        else:
            off = idx
        acc += tl.load(X + base[:, None] + off[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 1) / group_size

    acc2 = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        if CHANNELS_LAST:
            off = (idx // cpg).to(tl.int64) * C + idx % cpg
        else:
            off = idx
        x = tl.load(X + base[:, None] + off[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        acc2 += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, 1) / group_size + eps)

    for start in range(0, group_size, BLOCK):
        idx = start + offs
        m = row_ok[:, None] & (idx < group_size)[None, :]
        if CHANNELS_LAST:
            off = (idx // cpg).to(tl.int64) * C + idx % cpg
            c = g[:, None] * cpg + (idx % cpg)[None, :]
        else:
            off = idx
            c = g[:, None] * cpg + (idx // HW)[None, :]
        x = tl.load(X + base[:, None] + off[None, :], mask=m, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_AFFINE:
            w = tl.load(W + c, mask=m, other=1.0).to(tl.float32)
            b = tl.load(B + c, mask=m, other=0.0).to(tl.float32)
            y = y * w + b
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + base[:, None] + off[None, :], y.to(Y.dtype.element_ty), mask=m)


INTERPRETED: bool = is_interpreted(_groupnorm_silu_fwd)  # fixed when triton.jit decorated it

MAX_TILE = 8192  # ROWS * BLOCK fp32 accumulators per program (two such tiles live in registers)
PROGRAMS_PER_SM = 4  # enough programs to hide latency; more only adds launch and scheduling overhead


@dataclass(frozen=True)
class LaunchPlan:
    rows: int  # rows (sample, group) per program
    block: int  # elements of a row per chunk
    num_warps: int
    programs: int  # the grid


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def launch_plan(n_rows: int, group_size: int, sm_count: int, interpreted: bool = False) -> LaunchPlan:
    """How to launch for N * G = n_rows rows of group_size elements on a GPU with sm_count SMs.

    GPU: BLOCK is the row's next power of two between 128 and 2048. ROWS is a power of two: 1 while the grid
    would have fewer than PROGRAMS_PER_SM programs per SM, else as many as keep it about there, never more
    than MAX_TILE // BLOCK. Examples on 132 SMs: SD 1.5's 8x8 level at batch 64 with guidance (128 x 32 rows
    of 2560 elements) was 4096 one-row programs, now 1024 programs of 4 rows; one sample's 32 groups of 256
    elements were packed 8 to a program (4 programs on 132 SMs), now 32 programs. Interpreter: each program
    costs milliseconds of Python, so as many rows per program as the tile allows."""
    if interpreted:
        block = min(4096, triton.next_power_of_2(group_size))
        rows = max(1, min(triton.next_power_of_2(n_rows), 16384 // block))
        return LaunchPlan(rows, block, 4, triton.cdiv(n_rows, rows))
    block = min(2048, max(128, triton.next_power_of_2(group_size)))
    cap = max(1, MAX_TILE // block)
    want = n_rows // (PROGRAMS_PER_SM * max(1, sm_count))
    rows = max(1, min(cap, _pow2_floor(want) if want >= 1 else 1))
    num_warps = 8 if rows * block >= 4096 else 4
    return LaunchPlan(rows, block, num_warps, triton.cdiv(n_rows, rows))


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = int(torch.cuda.get_device_properties(index).multi_processor_count)
    return _sm_counts[index]


def layout(x: torch.Tensor) -> str:
    """'nchw' (contiguous), 'nhwc' (4-D channels_last, not also contiguous) or 'strided' (neither)."""
    if x.is_contiguous():
        return "nchw"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "strided"


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, silu: bool = True, plan: LaunchPlan | None = None) -> torch.Tensor:
    """silu(group_norm(x)) for a (N, C, *spatial) tensor, NCHW-contiguous or channels_last (other layouts
    are made contiguous); the output has x's layout. `plan`: a LaunchPlan in place of `launch_plan`'s."""
    if x.dim() < 2:
        raise ValueError(f"group norm needs (N, C, ...) input, got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    if layout(x) == "strided":
        x = x.contiguous()
    channels_last = layout(x) == "nhwc"
    hw = x.numel() // (N * C) if N * C else 0
    y = torch.empty_like(x)  # preserve_format: channels_last in, channels_last out
    group_size = (C // num_groups) * hw
    n_rows = N * num_groups
    if group_size == 0:
        return y
    has_affine = weight is not None and bias is not None
    if plan is None:
        plan = launch_plan(n_rows, group_size, 1 if INTERPRETED or not x.is_cuda else sm_count(x.device),
                           interpreted=INTERPRETED)
    w = weight if has_affine else x
    b = bias if has_affine else x
    grid = (triton.cdiv(n_rows, plan.rows),)
    with on_device(x.device):  # Triton launches on the current device: make it x's
        _groupnorm_silu_fwd[grid](
            x, y, w, b, n_rows, group_size, hw, C, num_groups, float(eps),
            APPLY_SILU=silu, HAS_AFFINE=has_affine, CHANNELS_LAST=channels_last, ROWS=plan.rows,
            BLOCK=plan.block, num_warps=plan.num_warps,
        )
    return y
