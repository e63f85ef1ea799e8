"""Backends run the three networks (text encoder, UNet, VAE decoder) of an `SDModel`; the engine owns
everything else. Each registers itself by name; `fastsd.optimize` looks them up here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import InvalidParameter
from ..loading import load_model
from ..model import SDModel

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


def is_onnx_export(spec: str) -> bool:
    """A folder with an ONNX UNet (`fastsd export`'s layout): what --backend openvino runs as it is."""
    return (Path(spec).expanduser() / "unet" / "model.onnx").is_file()


def load_for_backend(backend: str, spec: str, **load_kwargs) -> SDModel:
    """The model `backend` runs: for onnxruntime, `spec` is an ONNX export folder (`fastsd export`); for
    openvino, an export folder or any model (exported on the fly); otherwise `load_model(spec, **load_kwargs)`."""
    if backend == "onnxruntime" or (backend == "openvino" and is_onnx_export(spec)):
        from fastsd.export import load_onnx_model  # imports onnx tooling only when asked
        return load_onnx_model(spec)
    return load_model(spec, **load_kwargs)
