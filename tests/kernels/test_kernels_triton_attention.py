"""fastsd's Triton FlashAttention kernel against the `math` reference, in the Triton interpreter.

Shapes are small SD-like ones (batch*heads = 2, 64-130 queries) so each case takes well under 0.1 s
interpreted. The reference is `math` on the same (possibly fp16/bf16) inputs, computed in fp32 and
compared in fp32 before the final rounding, i.e. against softmax(QK^T)V of the rounded inputs.
"""

import pytest
import torch

from conftest import needs_triton

pytestmark = needs_triton

HEAD_DIMS = [40, 64, 80, 160]
# (queries, keys): self-attention with 130 tokens (not a multiple of the 64-row block: a partial query
# block and a partial key tile), cross-attention over 77 text tokens (64 + 13 masked key tail) with
# 100 queries, and an exact single block.
SHAPES = {"self130": (130, 130), "cross77": (100, 77), "block64": (64, 64)}

# Tolerances (max abs error against fp32 softmax(QK^T)V of the same inputs, inputs ~N(0,1), |out| <= 1.5).
# Measured under TRITON_INTERPRET=1 (triton 3.9, torch 2.13 CPU) over every head dim and shape here:
#   fp32: 9.5e-7                                                          -> 1e-5
#   fp16: 4.4e-4 (rounding the exact result to fp16 alone: 4.4e-4)         -> 2e-3
#   bf16: 7.6e-3 (rounding alone: 3.6e-3; 1 bf16 ulp in [1, 2) is 7.8e-3)   -> 2e-2
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(m, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, m, d, generator=g).to(dtype)
    k = torch.randn(1, 2, n, d, generator=g).to(dtype)
    v = torch.randn(1, 2, n, d, generator=g).to(dtype)
    return q, k, v


def _check(out, q, k, v, scale=None):
    from fastsd.kernels.math_attention import math_attention

    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    ref = math_attention(q.float(), k.float(), v.float(), scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs error {err:.3g} > {TOL[q.dtype]:.1g} ({q.dtype}, d={d})"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_flash_attention_matches_math(d, shape, dtype):
    from fastsd.kernels.triton_attention_kernel import flash_attention

    m, n = SHAPES[shape]
    q, k, v = _inputs(m, n, d, dtype)
    _check(flash_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_flash_attention_bf16_via_upcast(d):
    # bf16 tl.dot is wrong in the interpreter; the kernel upcasts bf16 tiles to fp32 there.
    from fastsd.kernels.triton_attention_kernel import flash_attention

    q, k, v = _inputs(*SHAPES["cross77"], d, torch.bfloat16, seed=3)
    _check(flash_attention(q, k, v), q, k, v)


def test_flash_attention_strided_views_and_scale():
    # The processor passes (B, H, N, D) views of (B, N, H*D) projections: non-contiguous strides.
    from fastsd.kernels.triton_attention_kernel import flash_attention

    g = torch.Generator().manual_seed(5)
    b, h, m, n, d = 1, 2, 70, 77, 40
    q = torch.randn(b, m, h * d, generator=g).view(b, m, h, d).transpose(1, 2)
    k = torch.randn(b, n, h * d, generator=g).view(b, n, h, d).transpose(1, 2)
    v = torch.randn(b, n, h * d, generator=g).view(b, n, h, d).transpose(1, 2)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, scale=0.3)
    _check(out, q, k, v, scale=0.3)


def test_large_scores_do_not_overflow_fp16():
    # Scores far beyond fp16's 65504 before softmax: the kernel keeps them in fp32.
    from fastsd.kernels.triton_attention_kernel import flash_attention

    q, k, v = _inputs(64, 77, 64, torch.float32, seed=7)
    q, k = (q * 40).half(), (k * 40).half()
    v = v.half()
    out = flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    _check(out, q, k, v)


def test_backend_through_registry():
    from fastsd.kernels import attention, choose_attention

    assert choose_attention("triton", "cpu", torch.float16) == "triton"
    q, k, v = _inputs(*SHAPES["self130"], 64, torch.float16)
    _check(attention(q, k, v, backend="triton"), q, k, v)
