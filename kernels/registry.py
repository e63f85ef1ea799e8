"""One registry of attention backends, and the `auto` choice between them.

Every backend is an `AttentionBackend`: a name, an attention function with the signature

    fn(q, k, v, *, scale: float, attn_mask: Tensor | None, upcast: bool) -> Tensor

where q is (batch, heads, queries, head_dim), k and v are (batch, heads, keys, head_dim) and the
result has q's shape and dtype, and an `available(device, dtype) -> (bool, reason)` check.
Backends that cannot take every input (a mask, a head dim) also provide `supports(q, k, v, mask)`;
the attention processor falls back to `sdpa` for those calls.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import BackendUnavailable

logger = logging.getLogger("fastsd.kernels")

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


_REGISTRY: dict[str, AttentionBackend] = {}
_LOCK = threading.Lock()

# The order `auto` tries backends in, per device type; the first available one wins.
#
# CUDA: `sdpa` first. torch's scaled_dot_product_attention dispatches to FlashAttention-2 (fp16/bf16,
# head dims up to 256, sm80+) or to the memory-efficient CUTLASS kernel (every dtype, older GPUs);
# both are forward+backward-tuned, need no compile step and no extra package. `xformers` ships the
# same families of kernels and is only worth preferring on a torch without them, so it comes second.
# fastsd's own `triton` kernel is third: it is correct (tested against `math` in the Triton
# interpreter) but it has not been timed on a GPU in this repository yet, its first call per shape
# pays compile + autotune time, and an unmeasured kernel should not displace torch's. Reorder this
# list once `python -m fastsd.bench.kernels` on the target GPU says otherwise.
#
# CPU: `sdpa` (torch's CPU flash-attention kernel: blocked, multi-threaded, no N^2 score matrix).
# `triton` on CPU exists only through the Triton interpreter, which is for testing (seconds to minutes
# per call) and is never chosen automatically; `math` is the FP32 reference and materialises the full
# score matrix, so it is the last resort.
AUTO_PREFERENCE: dict[str, list[str]] = {
    "cuda": ["sdpa", "xformers", "triton", "math"],
    "cpu": ["sdpa", "math"],
}
_DEFAULT_PREFERENCE = ["sdpa", "math"]

_logged_choices: set[tuple] = set()


def as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return torch.device(device)


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> AttentionBackend:
    with _LOCK:
        if backend.name in _REGISTRY and not replace:
            raise ValueError(f"attention backend {backend.name!r} is already registered")
        _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    with _LOCK:
        _REGISTRY.pop(name, None)


def list_backends() -> list[str]:
    """Every registered backend name, whether or not it can run here."""
    _ensure_builtin()
    return list(_REGISTRY)


def get_backend(name: str) -> AttentionBackend:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; registered: {', '.join(_REGISTRY)} (or 'auto')"
        ) from None


def backend_status(device, dtype) -> dict[str, tuple[bool, str]]:
    """`{name: (available, reason)}` for every registered backend on `device` with `dtype`."""
    _ensure_builtin()
    device = as_device(device)
    return {name: b.available(device, dtype) for name, b in list(_REGISTRY.items())}


def available_backends(device, dtype) -> list[str]:
    return [name for name, (ok, _) in backend_status(device, dtype).items() if ok]


def choose_attention(name: str, device, dtype) -> str:
    """Resolve `name` ("auto" or a backend name) to a backend that can run on `device` with `dtype`.

    "auto" takes the first available backend in `AUTO_PREFERENCE[device.type]` (checking none ranked
    below it) and logs, once per (device, dtype), what it picked and why each other backend was passed over. A backend named
    explicitly that cannot run raises `BackendUnavailable` (a ValueError) naming the backend, the
    reason, and the backends that can run.
    """
    _ensure_builtin()
    device = as_device(device)
    if name != "auto":
        backend = get_backend(name)
        ok, reason = backend.available(device, dtype)
        if not ok:
            raise BackendUnavailable(name, reason, available_backends(device, dtype), device, dtype)
        return name

    # Backends are checked in preference order and checking stops at the first that can run: a check
    # can cost seconds (the triton probe compiles and autotunes, xformers loads its extensions), and
    # nothing ranked below the winner would be used anyway.
    preferred = AUTO_PREFERENCE.get(device.type, _DEFAULT_PREFERENCE)
    with _LOCK:
        registered = list(_REGISTRY)
    order = [n for n in preferred if n in registered] + [n for n in registered if n not in preferred]
    status: dict[str, tuple[bool, str]] = {}
    chosen = None
    for candidate in order:  # preferred ones first; the rest only when none of those can run
        status[candidate] = get_backend(candidate).available(device, dtype)
        if status[candidate][0]:
            chosen = candidate
            break
    if chosen is None:
        raise BackendUnavailable(
            "auto", "no registered attention backend can run here", [], device, dtype
        )

    key = (device.type, device.index, dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        passed = []
        for other in order:
            if other == chosen:
                continue
            if other in status:
                passed.append(f"{other}: {status[other][1]}")
            elif other in preferred:
                passed.append(f"{other}: not checked (ranked below {chosen})")
            else:
                passed.append(f"{other}: not checked (not used automatically on {device.type})")
        logger.info(
            "attention 'auto' on %s/%s chose %r (preference %s); passed over: %s",
            device, str(dtype).replace("torch.", ""), chosen, " > ".join(preferred),
            "; ".join(passed) or "none",
        )
    return chosen


def attention(q, k, v, *, backend: str = "sdpa", scale: Optional[float] = None,
              attn_mask=None, upcast: bool = False) -> torch.Tensor:
    """Run attention with a named backend. q: (B, H, M, D); k, v: (B, H, N, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return get_backend(backend).fn(q, k, v, scale=scale, attn_mask=attn_mask, upcast=upcast)


_builtin_loaded = False


def _ensure_builtin() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    with _LOCK:
        if _builtin_loaded:
            return
        from . import math_attention, sdpa, triton_attention, xformers

        for mod in (math_attention, sdpa, xformers, triton_attention):
            _REGISTRY.setdefault(mod.BACKEND.name, mod.BACKEND)
        _builtin_loaded = True


def _reset_for_tests() -> None:
    """Forget the 'logged once' memory and cached availability probes."""
    _logged_choices.clear()
    from . import fused, xformers, triton_attention
    xformers.clear_probe_cache()
    triton_attention.clear_probe_cache()
    fused.clear_probe_cache()
