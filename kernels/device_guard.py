"""Which device a kernel call means, and running CUDA work on the device its tensors live on.

`as_device` turns what callers pass as a device (None, a string, a torch.device) into a torch.device,
None meaning the CPU.

torch ops follow their tensors' device, but three things use the *current* CUDA device instead: a
Triton launch (it takes the current device's stream and context), `torch.cuda.Stream()` and
`torch.cuda.graph` (a capture records only the current device's stream). With `--device cuda:1` and
nothing setting the current device, a capture records an empty graph (every replay does nothing)
and a Triton launch runs on GPU 0 with GPU 1's pointers. Every such place enters `on_device(...)`.
"""
from __future__ import annotations

import contextlib

import torch


def as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return torch.device(device)


def on_device(device):
    """A context manager making `device` the current CUDA device; a no-op for CPU (or any non-CUDA) devices."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)
