"""Module runners: a backend that runs the UNet (or the VAE decoder) of a diffusers pipeline in place of
its torch module, for `fastsd.accelerate(pipe, backend=...)`.

A runner factory registers under a backend name, is called as `factory(pipe, config, **options)` and
returns `{"unet": runner, "vae_decoder": runner}` (either may be missing). A runner is called with the
module's own signature,

    unet runner:        runner(sample, timestep, encoder_hidden_states, **other_forward_kwargs) -> Tensor
    vae_decoder runner: runner(latents, **other_decode_kwargs) -> Tensor (the image in [-1, 1])

and raises `Refused(reason)` for a call it cannot take (ControlNet residuals, added_cond_kwargs, a shape
outside its export, ...): the accelerated module then runs that call in torch and logs the reason once.
`describe()` says what the runner is. ONNX Runtime's runner is in onnxruntime_modules.py; another
backend (OpenVINO) plugs in with `register_module_runner("openvino")` and a line in _MODULES."""
from __future__ import annotations

from typing import Callable

from ..errors import InvalidParameter

_RUNNERS: dict[str, Callable] = {}
_MODULES = {"onnxruntime": "fastsd.backends.onnxruntime_modules"}


class Refused(Exception):
    """This call has an input the runner cannot take; the reason is logged once and torch runs it."""


def register_module_runner(name: str):
    def deco(factory):
        _RUNNERS[name] = factory
        return factory
    return deco


def lookup_module_runner(name: str) -> Callable:
    """The factory registered under `name` (its module imported on first use)."""
    if name not in _RUNNERS and name in _MODULES:
        import importlib
        importlib.import_module(_MODULES[name])
    if name not in _RUNNERS:
        raise InvalidParameter("backend", name, ", ".join(["torch", *sorted(set(_MODULES) | set(_RUNNERS))]))
    return _RUNNERS[name]


def module_runner_names() -> list[str]:
    return sorted(set(_MODULES) | set(_RUNNERS))


def extra_inputs(kwargs: dict) -> list[str]:
    """The names of keyword inputs that carry something (not None, not empty): what a graph exported
    with only the plain inputs cannot take."""
    out = []
    for k, v in kwargs.items():
        if v is None or (isinstance(v, (dict, list, tuple)) and len(v) == 0):
            continue
        out.append(k)
    return out
