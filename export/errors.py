"""Errors of `fastsd export` and of loading an export: each is a FastSDError (one line, exit 2 in the CLI)."""
from __future__ import annotations

from fastsd.errors import FastSDError, InvalidParameter, ModelLoadError, ReferenceMismatch


class ExportError(FastSDError):
    """Base of the export's own errors."""


class UnknownComponent(InvalidParameter):
    """--components named something that is not a graph fastsd exports."""


class UnsupportedOpset(InvalidParameter):
    """--opset outside what this exporter (and torch's ONNX exporter) supports."""


class OutputNotEmpty(ExportError):
    """--out holds files already; refused unless --overwrite."""


class DiskFull(ExportError):
    """Writing a graph failed for lack of space; the half-written files were removed."""


class WriteFailed(ExportError):
    """Writing a graph failed for another OS reason (permissions, read-only file system)."""


class TensorRTMissing(ExportError):
    """--tensorrt asked for engines where the `tensorrt` Python package is not installed."""


class TensorRTBuildFailed(ExportError):
    """TensorRT could not parse a graph or build an engine."""


class ParityError(ReferenceMismatch):
    """An exported graph is farther from the PyTorch FP32 module than the tolerance of its dtype."""


class NotAnExport(ModelLoadError):
    """A folder given to the onnxruntime backend that is not an ONNX export."""


class OnnxRuntimeMissing(ExportError):
    """onnx / onnxruntime are not installed (pip install 'fastsd[onnx]')."""
