"""fastsd: a fast Stable Diffusion inference engine that proves, per run, how far it is from FP32."""
from importlib import import_module

__version__ = "0.1.0"

# Imported on first use, so `fastsd --help` and `import fastsd.cli` stay light (no torch/diffusers).
_EXPORTS = {
    "Engine": "engine", "GenerationResult": "engine",
    "FastSDError": "errors", "InvalidParameter": "errors", "ModelLoadError": "errors",
    "SDModel": "loading", "load_model": "loading",
    "OptimizeConfig": "optimize", "optimize": "optimize",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
