"""Backends run the three networks (text encoder, UNet, VAE decoder) of an `SDModel`; the engine owns
everything else. One package per backend (torch, onnxruntime, openvino), each with its engine backend and,
where it has them, module runners for `fastsd.accelerate`. They are registered here by name as import
strings and imported on first use, so an optional dependency (onnxruntime, openvino) is needed only by who
asks for that backend, and this registry imports no backend."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InvalidParameter
from ..loading import load_model
from ..model import SDModel


@dataclass(frozen=True)
class BackendEntry:
    engine: str  # "module:attribute" of the factory `(model, config) -> backend` the Engine runs on
    runners: str | None = None  # "module:attribute" of `(pipe, config, **options) -> {role: runner}`


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("fastsd.backends.torch.backend:TorchBackend"),
    "onnxruntime": BackendEntry("fastsd.backends.onnxruntime.backend:OnnxRuntimeBackend",
                                "fastsd.backends.onnxruntime.runners:module_runners"),
    "openvino": BackendEntry("fastsd.backends.openvino.backend:OpenVINOBackend",
                             "fastsd.backends.openvino.runners:module_runners"),
}


def register_backend(name: str, engine: str, runners: str | None = None) -> None:
    """Add (or replace) a backend: import strings "module:attribute" of its factories (see BackendEntry)."""
    BACKENDS[name] = BackendEntry(engine, runners)


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def lookup_backend(name: str) -> Callable:
    """The factory `(model, config) -> backend` registered under `name`."""
    if name not in BACKENDS:
        raise InvalidParameter("backend", name, ", ".join(backend_names()))
    return _resolve(BACKENDS[name].engine)


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def lookup_module_runner(name: str) -> Callable:
    """The module-runner factory of backend `name` (for `fastsd.accelerate(pipe, backend=name)`)."""
    if name not in module_runner_names():
        raise InvalidParameter("backend", name, ", ".join(["torch", *module_runner_names()]))
    return _resolve(BACKENDS[name].runners)


def module_runner_names() -> list[str]:
    return sorted(n for n, e in BACKENDS.items() if e.runners is not None)


def is_onnx_export(spec: str) -> bool:
    """A folder with an ONNX UNet (`fastsd export`'s layout): what --backend openvino runs as it is."""
    return (Path(spec).expanduser() / "unet" / "model.onnx").is_file()


def load_for_backend(backend: str, spec: str, **load_kwargs) -> SDModel:
    """The model `backend` runs: for onnxruntime, `spec` is an ONNX export folder (`fastsd export`); for
    openvino, an export folder or any model (exported on the fly); otherwise `load_model(spec, **load_kwargs)`."""
    if backend == "onnxruntime" or (backend == "openvino" and is_onnx_export(spec)):
        if load_kwargs.get("vae_tiny"):
            raise InvalidParameter("vae_tiny", load_kwargs["vae_tiny"], f"nothing with an ONNX export on --backend "
                                   f"{backend}: the export's VAE graphs run; write an export with the tiny VAE "
                                   "(fastsd export --vae-tiny DIR) and run that")
        from fastsd.export import load_onnx_model  # the export reader imports onnx tooling: only when asked
        return load_onnx_model(spec)
    return load_model(spec, **load_kwargs)
