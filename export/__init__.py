"""fastsd.export: Stable Diffusion models as ONNX graphs (text encoder, UNet, VAE decoder and encoder),
each checked against PyTorch FP32 in ONNX Runtime, in the folder layout ONNX Runtime's, Optimum's and
diffusers' ONNX pipelines read, with TensorRT shape profiles and build commands.

    from fastsd import load_model
    from fastsd.export import export_model, load_onnx_model
    export_model(load_model("tiny"), "out/tiny-onnx")
    model = load_onnx_model("out/tiny-onnx")      # SDModel for the onnxruntime backend
"""
from .errors import (DiskFull, ExportError, NotAnExport, OutputNotEmpty, ParityError, TensorRTMissing,  # noqa: F401
                     UnknownComponent, UnsupportedOpset)
from .graphs import COMPONENTS  # noqa: F401
from .layout import load_onnx_model, reference_model  # noqa: F401


def __getattr__(name):  # the exporter imports onnx; loaded on first use
    if name in ("export_model", "export_onnx", "ExportOptions"):
        from . import exporter  # lazy: the exporter imports onnx
        return getattr(exporter, name)
    raise AttributeError(name)


__all__ = ["export_model", "export_onnx", "ExportOptions", "load_onnx_model", "reference_model", "COMPONENTS"]
