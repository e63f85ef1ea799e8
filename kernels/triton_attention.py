"""`triton`: fastsd's own FlashAttention forward kernel (see triton_attention_kernel.py).

Available when triton is installed and either the device is CUDA (compiled kernel) or the tensors are
on CPU with TRITON_INTERPRET=1 set before the kernel module is first imported (the Triton interpreter:
correct but slow, for tests; `auto` never picks it on CPU). Availability is decided by running a tiny
call, and cached per (device, dtype).

The kernel keeps scores, the running max/sum and the output accumulator in fp32 for every input dtype,
so `upcast` costs nothing here. It takes no attention mask and head dims up to 256, and only launch
configs that fit the GPU's shared memory without spilling (triton_attention_configs.py); for anything
else (a mask, head dim 160 in fp32, ...) the attention processor falls back to `sdpa` for that call.

A compiled launch that still fails to compile or fit (OutOfResources, a PTXAS or compilation error: a
smaller GPU than the configs were checked for) runs that call on `sdpa`, and every later call of the same
device, dtype and padded head dim goes to `sdpa` too (`supports` says so); logged once (triton_launch.py).
"""

from __future__ import annotations

import importlib

import torch

from .attention_backend import AttentionBackend
from .probe_cache import ProbeCache
from .sdpa import sdpa_attention
from .triton_attention_configs import padded_head_dim
from .triton_availability import triton_status
from .triton_launch import FailedLaunches, launch_failure

_probe_cache = ProbeCache()
_failed = FailedLaunches("attention", "sdpa")


def clear_probe_cache() -> None:
    _probe_cache.clear()
    _failed.clear()


def _launch_key(q) -> tuple:
    return (str(q.device), q.dtype, padded_head_dim(q.shape[-1]))


def _kernel_module():
    # by name, on first use: importing the kernel module imports triton, which `import fastsd` must not
    return importlib.import_module(".triton_attention_kernel", __package__)


def triton_attention(q, k, v, *, scale: float, attn_mask=None, upcast: bool = False) -> torch.Tensor:
    if attn_mask is not None:
        raise ValueError("the triton attention kernel takes no attention mask")
    key = _launch_key(q)
    if _failed.get(key) is None:
        try:
            return _kernel_module().flash_attention(q, k, v, scale=scale)
        except Exception as exc:
            why = launch_failure(exc)
            if why is None:
                raise
            _failed.add(key, why)
    return sdpa_attention(q, k, v, scale=scale, attn_mask=None, upcast=upcast)


def _supports(q, k, v, attn_mask):
    if attn_mask is not None:
        return False, "attention masks are not supported by the triton kernel"
    if q.shape[-1] > 256:
        return False, f"head dim {q.shape[-1]} > 256"
    if q.device.type == "cpu" and q.dtype == torch.float64:
        return False, "float64"
    failed = _failed.get(_launch_key(q))
    if failed:
        return False, f"the kernel failed to launch for this head dim and dtype here ({failed})"
    if q.device.type == "cuda":  # e.g. head dim 160 in fp32: no config fits the GPU's shared memory
        why = _kernel_module().unusable_reason(q, k.shape[2])
        if why:
            return False, why
    return True, ""


def _check(device: torch.device, dtype: torch.dtype):
    ok, reason = triton_status(device)
    if not ok:
        return False, reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"the triton attention kernel takes fp16, bf16 or fp32, not {dtype}"
    if device.type == "cuda" and dtype == torch.bfloat16:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        if major < 8:
            return False, f"bf16 tl.dot needs compute capability 8.0+, this GPU is {major}.{minor}"
    return _probe_cache.get((device.type, device.index, dtype), lambda: _probe(device, dtype, reason))


def _probe(device: torch.device, dtype: torch.dtype, reason: str):
    try:
        mod = _kernel_module()
    except Exception as exc:
        return False, f"triton kernel module failed to import: {type(exc).__name__}: {exc}"
    if device.type == "cpu" and not mod.INTERPRETED:
        return False, ("TRITON_INTERPRET=1 was not set when fastsd.kernels.triton_attention_kernel was first "
                       "imported, so its kernels were built for a GPU; set it before importing")
    if device.type == "cuda" and mod.INTERPRETED:
        return False, "the triton kernels were imported in interpreter mode (TRITON_INTERPRET=1)"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, 1, 5, 8, generator=g).to(device=device, dtype=dtype)
        out = mod.flash_attention(q, q, q, scale=8 ** -0.5)
        ref = torch.softmax((q.float() @ q.float().transpose(-1, -2)) * 8 ** -0.5, -1) @ q.float()
        err = (out.float() - ref).abs().max().item()
        if not err < 5e-2:
            return False, f"triton attention probe call gave wrong results (max error {err:.3g})"
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        return False, f"triton attention probe call failed: {type(exc).__name__}: {first}"
    return True, reason


BACKEND = AttentionBackend(
    name="triton",
    fn=triton_attention,
    check=_check,
    description="fastsd FlashAttention forward kernel in Triton",
    fp32_softmax=True,
    supports=_supports,
)
