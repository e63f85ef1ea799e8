"""Backends run the three networks (text encoder, UNet, VAE decoder) of an `SDModel`; the engine owns
everything else. Each registers itself by name; `fastsd.optimize` looks them up here."""
from __future__ import annotations

from typing import Callable

from ..errors import InvalidParameter

_BACKENDS: dict[str, Callable] = {}
_MODULES = {"torch": "fastsd.backends.torch", "onnxruntime": "fastsd.backends.onnxruntime",
            "openvino": "fastsd.backends.openvino"}


def register_backend(name: str):
    def deco(factory):
        _BACKENDS[name] = factory
        return factory
    return deco


def lookup_backend(name: str) -> Callable:
    """The factory `(model, config) -> backend` registered under `name` (imported on first use, so an
    optional dependency is needed only by who asks for that backend)."""
    if name not in _BACKENDS and name in _MODULES:
        import importlib
        importlib.import_module(_MODULES[name])
    if name not in _BACKENDS:
        raise InvalidParameter("backend", name, ", ".join(sorted(_MODULES)))
    return _BACKENDS[name]


def backend_names() -> list[str]:
    return sorted(_MODULES)
