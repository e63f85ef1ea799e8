"""Whether Triton kernels can launch for tensors on a device (no dtype-specific check, no triton import).

Shared by the `triton` attention backend and the fused ops: each adds its own dtype checks and a probe
call on top of this.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can launch for tensors on `device` (no dtype-specific check)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'fastsd[triton]')"
    env_interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA device requested but torch.cuda.is_available() is False"
        if env_interp:
            return False, "TRITON_INTERPRET=1 is set: Triton would interpret, not compile, on this GPU"
        return True, "compiled Triton kernels on CUDA"
    if device.type == "cpu":
        if not env_interp:
            return False, ("Triton has no CPU backend (only nvidia/amd drivers ship); set TRITON_INTERPRET=1 "
                           "to run its kernels in the interpreter (tests only, very slow)")
        return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1): for tests, very slow"
    return False, f"Triton kernels do not run on {device.type} tensors"
