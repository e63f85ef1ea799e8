"""fastsd: a fast Stable Diffusion inference engine that proves, per run, how far it is from FP32."""
from .engine import Engine, GenerationResult
from .errors import FastSDError, InvalidParameter, ModelLoadError
from .loading import SDModel, load_model
from .optimize import OptimizeConfig, optimize

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationResult", "FastSDError", "InvalidParameter", "ModelLoadError", "SDModel",
           "load_model", "OptimizeConfig", "optimize", "__version__"]
