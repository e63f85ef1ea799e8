"""Triton launches that fail to compile or to fit the GPU: recognised, remembered, logged once.

A launch with one config (a fused op, an attention call whose shape leaves the autotuner one config) is
compiled on its first call and nothing times it beforehand: on a GPU with less shared memory or fewer
registers than the config assumed it raises OutOfResources, a PTXAS error or a CompilationError. The
callers (the `triton` attention backend, the fused ops) catch exactly those, run the call on their fallback
(SDPA, torch), remember the key so later calls go straight there, and log once per key. Any other exception
(a bug, an illegal memory access) is raised as it is.

No triton import here: the error classes are looked up by name in modules that are already imported.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Hashable

logger = logging.getLogger("fastsd.kernels")

# (module, class) of the exceptions a failed compile or an over-sized launch raises, Triton 3.0 to 3.9
_ERRORS = (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
           ("triton.compiler.errors", "CompilationError"), ("triton.runtime.autotuner", "AutotunerError"),
           ("triton.runtime.errors", "AutotunerError"))


def launch_failure(exc: BaseException) -> str | None:
    """Why `exc` means the kernel cannot compile or launch here (a one-line reason), or None for any other
    exception. fastsd's own NoUsableConfig (no config fits) counts; so does a RuntimeError that Triton's
    launcher raises with "Triton Error" (e.g. too many resources requested for launch)."""
    names = {cls for mod, cls in _ERRORS if getattr(sys.modules.get(mod), cls, None) is not None
             and isinstance(exc, getattr(sys.modules[mod], cls))}
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    if names or type(exc).__name__ == "NoUsableConfig":
        return f"{type(exc).__name__}: {first}"
    if isinstance(exc, RuntimeError) and first.startswith("Triton Error"):
        return f"{type(exc).__name__}: {first}"
    return None


class FailedLaunches:
    """Keys (device, dtype, kernel variant) whose launch failed, with the reason; logs the first time."""

    def __init__(self, what: str, fallback: str):
        self.what, self.fallback = what, fallback
        self._failed: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> str | None:
        return self._failed.get(key)

    def add(self, key: Hashable, reason: str) -> None:
        with self._lock:
            if key in self._failed:
                return
            self._failed[key] = reason
        logger.warning("triton %s cannot launch for %s (%s): using %s for these calls from now on",
                       self.what, key, reason, self.fallback)

    def clear(self) -> None:
        with self._lock:
            self._failed.clear()
