"""fastsd: a fast Stable Diffusion inference engine that proves, per run, how far it is from FP32."""
import logging as _logging


class _DropNoise(_logging.Filter):
    """Two library notices that are wrong for fastsd: transformers asks for torchvision (its PIL image
    processor is what we want), and diffusers warns about casting models that have no fp32-only parts."""
    NOISE = ("requires torchvision", "should be kept in float32: []")

    def filter(self, record):
        return not any(n in record.getMessage() for n in self.NOISE)


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropNoise())
_logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropNoise())

from .engine import Engine, GenerationResult  # noqa: E402
from .errors import FastSDError, InvalidParameter, ModelLoadError  # noqa: E402
from .loading import load_model  # noqa: E402
from .model import SDModel  # noqa: E402
from .optimize import OptimizeConfig, optimize  # noqa: E402  (binds the function over the submodule)
from .accelerate import accelerate, deaccelerate, restore  # noqa: E402  (the drop-in for diffusers pipelines)
from .pipeline_verify import verify_pipeline  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationResult", "FastSDError", "InvalidParameter", "ModelLoadError", "SDModel",
           "load_model", "OptimizeConfig", "optimize", "accelerate", "deaccelerate", "restore", "verify_pipeline", "__version__"]
