"""`xformers`: xformers.ops.memory_efficient_attention (optional package, CUDA only).

xformers installs on a CPU-only machine and imports, but every op behind memory_efficient_attention
is CUDA-only: a call on CPU tensors raises NotImplementedError. diffusers' `is_xformers_available()`
only checks the import, so it says True there. This backend instead decides availability by TRYING a
tiny call on the requested device and dtype, and caches the answer per (device, dtype).
"""

from __future__ import annotations

import importlib

import torch

from .attention_backend import AttentionBackend
from .probe_cache import ProbeCache

_probe_cache = ProbeCache()


def clear_probe_cache() -> None:
    _probe_cache.clear()


def _ops():
    return importlib.import_module("xformers.ops")


def xformers_attention(q, k, v, *, scale: float, attn_mask=None, upcast: bool = False) -> torch.Tensor:
    # xformers takes (batch, seq, heads, head_dim); its kernels accumulate in fp32, so `upcast` is free.
    xops = _ops()
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=None, scale=scale
    )
    return out.transpose(1, 2)


def _supports(q, k, v, attn_mask):
    if attn_mask is not None:
        return False, "attention masks are not passed to xformers by fastsd"
    return True, ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _check(device: torch.device, dtype: torch.dtype):
    return _probe_cache.get((device.type, device.index, dtype), lambda: _probe(device, dtype))


def _probe(device: torch.device, dtype: torch.dtype):
    try:
        xops = _ops()
    except ImportError as exc:
        return False, f"xformers is not installed ({_first_line(exc)}); pip install 'fastsd[xformers]'"
    except Exception as exc:  # broken install: wrong torch ABI, missing CUDA libraries, ...
        return False, f"xformers is installed but does not import: {_first_line(exc)}"
    version = getattr(importlib.import_module("xformers"), "__version__", "?")
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, f"xformers {version}: CUDA device requested but torch.cuda.is_available() is False"
    try:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=dtype)
        out = xops.memory_efficient_attention(q, q, q)
        if out.shape != q.shape:
            return False, f"xformers {version} returned shape {tuple(out.shape)} for a (1, 8, 1, 64) probe"
    except Exception as exc:
        return False, (
            f"xformers {version} is installed but memory_efficient_attention cannot run on "
            f"{device} with {dtype} (tried a tiny call: {_first_line(exc)})"
        )
    return True, f"xformers {version} memory_efficient_attention ran a probe call"


BACKEND = AttentionBackend(
    name="xformers",
    fn=xformers_attention,
    check=_check,
    description="xformers.ops.memory_efficient_attention (CUDA only)",
    fp32_softmax=True,
    supports=_supports,
)
