"""Cached answers of availability probes: "can this kernel run on this device with this dtype?".

A probe runs a tiny call (an xformers op, a Triton compile and autotune), which can cost seconds, so
each backend or fused op asks once per key and keeps the answer. Every cache registers itself here, so
that the registry can forget all of them (`clear_probe_caches`) without importing the modules that
own them: the registry sits below the backends and must not import them.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable

_ALL_CACHES: "weakref.WeakSet[ProbeCache]" = weakref.WeakSet()


class ProbeCache:
    """`(ok, reason)` per key, filled by running `probe()` the first time a key is asked for."""

    def __init__(self):
        self._results: dict[Hashable, tuple[bool, str]] = {}
        self._lock = threading.Lock()
        _ALL_CACHES.add(self)

    def get(self, key: Hashable, probe: Callable[[], "tuple[bool, str]"]) -> tuple[bool, str]:
        with self._lock:
            if key in self._results:
                return self._results[key]
        # The probe runs outside the lock: it can take seconds, and other keys need not wait for it.
        result = probe()
        with self._lock:
            self._results[key] = result
        return result

    def clear(self) -> None:
        with self._lock:
            self._results.clear()


def clear_probe_caches() -> None:
    """Forget every cached probe answer (of the backends and fused ops imported so far)."""
    for cache in list(_ALL_CACHES):
        cache.clear()
