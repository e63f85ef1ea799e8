"""fastsd's FlashAttention forward kernel in Triton (imported lazily: importing this imports triton).

One program computes BLOCK_M query rows of one (batch, head) against all keys, streaming keys and
values in BLOCK_N tiles with an online softmax (running row max and row sum, fp32 accumulator), so the
(queries x keys) score matrix never exists in memory.

Shapes fastsd needs: self-attention over 256..9216 tokens (SD 1.5/2.1 latents from 16x16 to 96x96)
and cross-attention over 77 text tokens; head dims 40, 64, 80, 160. `tl.arange` needs powers of two,
so the head dim is padded to BLOCK_D (40->64, 80->128, 160->256) and loads/stores are masked on d.
Keys past the end of the last tile get -inf scores before the row max; query rows past the end are
computed on zeros and not stored.

On a GPU the autotuner times only the configs of triton_attention_configs.py that fit the device's
shared memory (compiled sizes, no register spills); a call for which none fits raises NoUsableConfig,
and the backend's `supports` check sends such calls to another backend first. Launches run with the
tensors' device made current (a Triton launch uses the current device's stream).

Whether this module runs compiled (GPU) or interpreted (TRITON_INTERPRET=1, CPU tensors) is fixed when
it is imported: triton.jit reads TRITON_INTERPRET at decoration time.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .device_guard import on_device
from .triton_attention_configs import ARCH_SMEM_LIMIT, CONFIGS, padded_head_dim, usable_configs
from .triton_mode import is_interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd(
    Q, K, V, O,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2)
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    H, M, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast q/k/v tiles to fp32 before tl.dot (bf16 in the interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 tiles on GPU
):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = pid_zh // H
    h = pid_zh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D

    q_ptrs = Q + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = K + z * stride_kz + h * stride_kh
    v_base = V + z * stride_vz + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < N
        # K tile loaded transposed: (BLOCK_D, BLOCK_N)
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        # keys past N: -inf before the row max, so they get exactly zero weight
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # first tile: exp2(-inf) = 0
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
            pv = tl.dot(p, v, input_precision=INPUT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


INTERPRETED: bool = is_interpreted(_attn_fwd)  # fixed when triton.jit decorated it


def _prune_configs(configs, named_args, *, smem_limit: int, **kwargs):
    # Shared memory and register limits first (triton_attention_configs), then no tile wider than the keys.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    dot_fp32 = bool(kwargs.get("DOT_FP32", named_args.get("DOT_FP32", False)))
    n = named_args.get("N", kwargs.get("N", 4096))
    usable = set(usable_configs(block_d, dot_fp32, smem_limit, n_keys=n))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in usable]
    if not kept:  # flash_attention checks first; reaching this is a bug, not a slow path
        raise NoUsableConfig(f"no triton attention config fits BLOCK_D={block_d} (dot_fp32={dot_fp32}) "
                             f"in {smem_limit // 1024} KB of shared memory")
    return kept


class NoUsableConfig(ValueError):
    """No launch config of the kernel fits this GPU at this head dim and dtype (use another backend)."""


# Fixed config under the interpreter: one small tile keeps CPU tests fast and still exercises
# partial query blocks (M not a multiple of 64) and masked key tails (77 keys -> 64 + 13).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

# One autotuner per shared-memory limit: its configs are pruned for that limit, and its cache of timings
# (keyed on shapes, not devices) is never shared between GPUs of different kinds.
_tuned: dict[int, object] = {}
ALL_CONFIGS = sorted({cfg for listed in CONFIGS.values() for cfg, _ in listed})


def _tuned_kernel(smem_limit: int):
    if smem_limit not in _tuned:
        _tuned[smem_limit] = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                     for bm, bn, w, s in ALL_CONFIGS],
            key=["M", "N", "BLOCK_D", "DOT_FP32"],
            prune_configs_by={"early_config_prune": functools.partial(_prune_configs, smem_limit=smem_limit)},
        )(_attn_fwd)
    return _tuned[smem_limit]


_smem_limits: dict[int, int] = {}


def device_smem_limit(device: torch.device) -> int:
    """Shared memory per block the CUDA device allows (opt-in maximum), asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _smem_limits:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if not limit:  # older torch: the table by compute capability (sm75's 64 KB when unknown)
            limit = ARCH_SMEM_LIMIT.get(props.major * 10 + props.minor, ARCH_SMEM_LIMIT[75])
        _smem_limits[index] = int(limit)
    return _smem_limits[index]


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRETED)


def unusable_reason(q: torch.Tensor, n_keys: int) -> str:
    """'' when some config can run this call on q's GPU, else why none can (the caller uses another backend)."""
    if INTERPRETED or q.device.type != "cuda":
        return ""
    block_d = padded_head_dim(q.shape[-1])
    if usable_configs(block_d, _dot_fp32(q.dtype), device_smem_limit(q.device), n_keys):
        return ""
    return (f"no triton attention config fits head dim {q.shape[-1]} (padded to {block_d}) in {q.dtype} "
            f"within {device_smem_limit(q.device) // 1024} KB shared memory without spilling registers")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention without a mask. q: (B, H, M, D); k, v: (B, H, N, D); any strides with unit-free
    indexing. Returns (B, H, M, D) in q's dtype: a transposed view of a (B, M, H, D) buffer, so the
    processor's transpose(1, 2).reshape(B, M, H*D) costs nothing."""
    B, H, M, D = q.shape
    N = k.shape[2]
    if k.shape != (B, H, N, D) or v.shape != (B, H, N, D):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported by the triton attention kernel")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, M, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    block_d = padded_head_dim(D)
    dot_fp32 = _dot_fp32(q.dtype)
    # fp32 tiles follow torch's matmul setting (exact "ieee" unless TF32 is allowed); fp16/bf16 tiles
    # take Triton's default (the setting only matters for fp32 operands).
    precision = "tf32"
    if dot_fp32 and not (q.is_cuda and q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    args = (
        q, k, v, out, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, M, N, D,
    )
    if INTERPRETED:
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), B * H)
        _attn_fwd[grid](*args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
                        DOT_FP32=dot_fp32, INPUT_PRECISION=precision)
        return out
    why = unusable_reason(q, N)
    if why:
        raise NoUsableConfig(why)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * H)

    with on_device(q.device):  # Triton launches on the current device: make it q's
        _tuned_kernel(device_smem_limit(q.device))[grid](*args, BLOCK_D=block_d, DOT_FP32=dot_fp32,
                                                         INPUT_PRECISION=precision)
    return out
