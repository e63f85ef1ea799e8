"""The type every attention backend is: `AttentionBackend`, shared by the registry and the backends.

A backend has a name, an attention function with the signature

    fn(q, k, v, *, scale: float, attn_mask: Tensor | None, upcast: bool) -> Tensor

where q is (batch, heads, queries, head_dim), k and v are (batch, heads, keys, head_dim) and the
result has q's shape and dtype, and an `available(device, dtype) -> (bool, reason)` check.
Backends that cannot take every input (a mask, a head dim) also provide `supports(q, k, v, mask)`;
the attention processor falls back to `sdpa` for those calls.

This module sits below both the registry and the backend modules (math_attention, sdpa, xformers,
triton_attention), so that each backend can build its `BACKEND` without importing the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .device_guard import as_device

AttentionFn = Callable[..., torch.Tensor]
CheckFn = Callable[[torch.device, torch.dtype], "tuple[bool, str]"]


def _always_supported(q, k, v, attn_mask) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: AttentionFn
    check: CheckFn
    description: str = ""
    # Whether the backend computes scores and softmax in fp32 whatever the input dtype
    # (so `upcast` costs it nothing and it is safe for SD 2.x in fp16).
    fp32_softmax: bool = False
    supports: Callable[..., "tuple[bool, str]"] = field(default=_always_supported)

    def available(self, device, dtype) -> tuple[bool, str]:
        device = as_device(device)
        try:
            ok, reason = self.check(device, dtype)
        except Exception as exc:  # an availability check must never take the caller down
            return False, f"availability check failed: {type(exc).__name__}: {exc}"
        return bool(ok), reason
