"""One registry of attention backends, and the `auto` choice between them.

Backends are registered by name. The built-in ones are registered as a "module:attribute" string
(`BUILTIN_BACKENDS`) and imported on first use, so this module imports no backend module: each
backend imports only the shared `AttentionBackend` type (attention_backend.py) below it, and
`import fastsd.kernels` loads none of them. What a backend is: see attention_backend.py.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional, Union

import torch

from .attention_backend import AttentionBackend
from .device_guard import as_device
from .errors import BackendUnavailable
from .probe_cache import clear_probe_caches

logger = logging.getLogger("fastsd.kernels")

# name -> "module:attribute" of its AttentionBackend, resolved with importlib when first asked for.
BUILTIN_BACKENDS: dict[str, str] = {
    "math": "fastsd.kernels.math_attention:BACKEND",
    "sdpa": "fastsd.kernels.sdpa:BACKEND",
    "xformers": "fastsd.kernels.xformers:BACKEND",
    "triton": "fastsd.kernels.triton_attention:BACKEND",
}

# A value is an AttentionBackend, or the "module:attribute" string of one not imported yet.
_REGISTRY: dict[str, Union[AttentionBackend, str]] = dict(BUILTIN_BACKENDS)
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
    return list(_REGISTRY)


def get_backend(name: str) -> AttentionBackend:
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; registered: {', '.join(_REGISTRY)} (or 'auto')"
        ) from None
    if not isinstance(entry, str):
        return entry
    module, _, attribute = entry.partition(":")
    # Imported outside the lock: a backend module may take a while to import, and importing it must
    # not wait on (or block) other registry calls.
    backend = getattr(importlib.import_module(module), attribute)
    with _LOCK:
        if _REGISTRY.get(name) is entry:  # unless it was replaced or removed meanwhile
            _REGISTRY[name] = backend
    return backend


def backend_status(device, dtype) -> dict[str, tuple[bool, str]]:
    """`{name: (available, reason)}` for every registered backend on `device` with `dtype`."""
    device = as_device(device)
    return {name: get_backend(name).available(device, dtype) for name in list(_REGISTRY)}


def available_backends(device, dtype) -> list[str]:
    return [name for name, (ok, _) in backend_status(device, dtype).items() if ok]


def choose_attention(name: str, device, dtype) -> str:
    """Resolve `name` ("auto" or a backend name) to a backend that can run on `device` with `dtype`.

    "auto" takes the first available backend in `AUTO_PREFERENCE[device.type]` (checking none ranked
    below it) and logs, once per (device, dtype), what it picked and why each other backend was passed over. A backend named
    explicitly that cannot run raises `BackendUnavailable` (a ValueError) naming the backend, the
    reason, and the backends that can run.
    """
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


def _reset_for_tests() -> None:
    """Forget the 'logged once' memory and cached availability probes."""
    _logged_choices.clear()
    clear_probe_caches()
