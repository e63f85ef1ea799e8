"""fastsd: a fast Stable Diffusion inference engine that proves, per run, how far it is from FP32.

The names below are imported on first use (PEP 562), so a process that uses only a light part of the
package (the serving supervisor, load balancer, REST gateway and metrics exporter, `fastsd status`)
never imports torch or diffusers: `import fastsd.serving.supervisor` stays at a few tens of MB.
"""
import importlib as _importlib
import logging as _logging
import sys as _sys
import types as _types


class _DropNoise(_logging.Filter):
    """Two library notices that are wrong for fastsd: transformers asks for torchvision (its PIL image
    processor is what we want), and diffusers warns about casting models that have no fp32-only parts."""
    NOISE = ("requires torchvision", "should be kept in float32: []")

    def filter(self, record):
        return not any(n in record.getMessage() for n in self.NOISE)


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropNoise())
_logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropNoise())

from .errors import FastSDError, InvalidParameter, ModelLoadError  # noqa: E402  (standard library only)

__version__ = "0.1.0"
# name -> the module that defines it; imported when the name is first read
_LAZY = {"Engine": "engine", "GenerationResult": "engine", "load_model": "loading", "SDModel": "model",
         "OptimizeConfig": "optimize", "optimize": "optimize", "accelerate": "accelerate",
         "deaccelerate": "accelerate", "restore": "accelerate", "verify_pipeline": "pipeline_verify"}
__all__ = ["Engine", "GenerationResult", "FastSDError", "InvalidParameter", "ModelLoadError", "SDModel",
           "load_model", "OptimizeConfig", "optimize", "accelerate", "deaccelerate", "restore", "verify_pipeline",
           "__version__"]


class _Package(_types.ModuleType):
    """`fastsd.optimize` and `fastsd.accelerate` are the functions, not their submodules: importing a
    submodule sets the package attribute of its name, which would otherwise replace the function."""

    def __getattr__(self, name):
        if name not in _LAZY:
            raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, _types.ModuleType):
            self.__dict__.pop(name, None)  # read again through __getattr__: the function, not the module
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_LAZY))


_sys.modules[__name__].__class__ = _Package
