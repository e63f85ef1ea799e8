"""`math`: the reference attention, softmax(Q K^T * scale + mask) V computed explicitly in FP32.

It materialises the whole (batch, heads, queries, keys) score matrix in fp32, so it is the slowest and
most memory-hungry backend; every other backend is tested against it.
"""

from __future__ import annotations

import torch

from .attention_backend import AttentionBackend


def math_attention(q, k, v, *, scale: float, attn_mask=None, upcast: bool = True) -> torch.Tensor:
    out_dtype = q.dtype
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(out_dtype)


def _check(device: torch.device, dtype: torch.dtype):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False, f"math attention takes floating-point tensors, not {dtype}"
    return True, "reference implementation, runs anywhere torch does"


BACKEND = AttentionBackend(
    name="math",
    fn=math_attention,
    check=_check,
    description="explicit softmax(QK^T)V in fp32 (reference)",
    fp32_softmax=True,
)
