"""Parity of an exported graph with the PyTorch FP32 module it came from, on the same seeded inputs.

Errors are taken over every output of the graph: max abs = max |onnx - torch|; relative = max abs /
max |torch| (the error as a fraction of the output's range, which is what matters downstream).
A graph passes when its relative error is within the tolerance of its dtype."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

# Relative error (max abs / max |reference|) allowed per exported dtype. Measured on SD 1.4 (random
# weights, fp32): UNet rel 1.5e-6, VAE decoder rel 2.3e-5 (README, "Export"); fp16 graphs of the tiny
# model stay within the fp16 bound in tests/export.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class Parity:
    graph: str  # e.g. unet/model.onnx
    dtype: str
    shapes: dict
    provider: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool

    def line(self) -> str:
        return (f"{self.graph:<28} {self.dtype:<5} max abs {self.max_abs:9.2e}  rel {self.max_rel:9.2e}  "
                f"(rel <= {self.tolerance:g})  {'ok' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        return asdict(self)


def session(path, providers=("CPUExecutionProvider",), threads: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers))


def torch_outputs(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def compare(graph: str, dtype: str, sess, reference: list[np.ndarray], inputs: dict[str, torch.Tensor]) -> Parity:
    feed = {name: t.numpy() for name, t in inputs.items()}
    got = sess.run(None, feed)
    max_abs, scale = 0.0, 0.0
    for a, b in zip(got, reference):
        a = np.asarray(a, dtype=np.float64)
        b = b.astype(np.float64)
        if a.shape != b.shape:
            max_abs, scale = float("inf"), 1.0
            break
        diff = np.abs(a - b)
        max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max()))
        scale = max(scale, float(np.abs(b).max()))
    rel = max_abs / scale if scale > 0 else max_abs
    tol = TOLERANCES[dtype]
    return Parity(graph, dtype, {k: list(v.shape) for k, v in inputs.items()}, sess.get_providers()[0],
                  max_abs, rel, tol, bool(rel <= tol))
