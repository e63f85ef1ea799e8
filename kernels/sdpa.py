"""`sdpa`: torch.nn.functional.scaled_dot_product_attention.

torch dispatches to its own kernels: FlashAttention-2 or the memory-efficient kernel on CUDA, a
blocked flash-attention kernel on CPU, and a "math" composite as a last resort. The fused kernels
accumulate scores and softmax in fp32; the composite does not, which is where fp16 can overflow
(SD 2.x). With `upcast=True` and fp16 inputs this backend therefore
  - on CUDA restricts dispatch to the flash / memory-efficient kernels (fp32 softmax inside), and if
    neither accepts the inputs, runs the call on fp32 copies;
  - elsewhere runs the call on fp32 copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_backend import AttentionBackend

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _FP32_SOFTMAX_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
except ImportError:  # pragma: no cover - older torch
    sdpa_kernel = None
    _FP32_SOFTMAX_KERNELS = None


def _sdpa(q, k, v, scale, attn_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                          is_causal=False, scale=scale)


def sdpa_attention(q, k, v, *, scale: float, attn_mask=None, upcast: bool = False) -> torch.Tensor:
    if upcast and q.dtype == torch.float16:
        if q.is_cuda and sdpa_kernel is not None:
            try:
                with sdpa_kernel(_FP32_SOFTMAX_KERNELS):
                    return _sdpa(q, k, v, scale, attn_mask)
            except RuntimeError:
                pass  # no fused kernel takes these inputs: do it in fp32 below
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        return _sdpa(q.float(), k.float(), v.float(), scale, mask).to(q.dtype)
    return _sdpa(q, k, v, scale, attn_mask)


def _check(device: torch.device, dtype: torch.dtype):
    if not hasattr(F, "scaled_dot_product_attention"):
        return False, f"torch {torch.__version__} has no scaled_dot_product_attention (needs torch 2.0+)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False, f"scaled_dot_product_attention takes floating-point tensors, not {dtype}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "CUDA device requested but torch.cuda.is_available() is False"
    return True, f"torch {torch.__version__} scaled_dot_product_attention"


BACKEND = AttentionBackend(
    name="sdpa",
    fn=sdpa_attention,
    check=_check,
    description="torch.nn.functional.scaled_dot_product_attention",
    fp32_softmax=False,
)
