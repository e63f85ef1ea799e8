"""Graph rewrites after the export: fp16 conversion and ONNX Runtime's transformer optimizer.

fp16: onnxruntime's own float16 converter with keep_io_types=True, so the graph still takes and gives
float32 (inputs, timestep and outputs) and the pipelines around it need no change. (onnxconverter-common's
converter produced a UNet that failed to load: a Cast type mismatch at the time projection.)

--optimize: onnxruntime.transformers.optimizer (model types clip / unet / vae), two variants:
  cpu  fusions that have CPU kernels only (no NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu,
       BiasAdd, packed QKV/KV attention): runs on every provider; written as model.onnx
  gpu  every fusion (NHWC convolutions, GroupNorm, fused attention): for the CUDA and TensorRT
       providers only; written as model.gpu.onnx
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx

log = logging.getLogger("fastsd")

OPTIMIZER_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
# fusions whose ops have no CPU kernel in onnxruntime (FusionOptions attribute names)
NO_CPU_KERNEL = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                 "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
VARIANTS = ("cpu", "gpu")


def to_fp16(model: onnx.ModelProto, big: bool = False) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    # shape inference works on serialized protos, which cannot pass 2 GB: skip it for big graphs
    return tidy(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big))


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """What onnx.checker wants and the rewrites leave undone: nodes in topological order (the fp16
    converter appends its input Casts at the end) and an opset import for every domain used (the
    optimizer's com.microsoft ops)."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    m = OnnxModel(model)
    m.topological_sort()
    model = m.model
    have = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - have - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return model


def fusion_options(comp: str, variant: str, fp16: bool):
    from onnxruntime.transformers.fusion_options import FusionOptions
    opts = FusionOptions(OPTIMIZER_TYPES[comp])
    if variant == "cpu":
        for name in NO_CPU_KERNEL:
            setattr(opts, name, False)
    elif not fp16:
        # the CUDA kernels of packed QKV/KV attention are fp16-only
        opts.enable_packed_qkv = opts.enable_packed_kv = False
    return opts


@contextlib.contextmanager
def _numpy_scalar_shim():
    """onnxruntime 1.32's UNet attention fusion reads the head count with int() of a one-element array,
    which NumPy 2.4 refuses (TypeError). While the optimizer runs, read that element explicitly instead."""
    import importlib
    import sys
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path, imports the fusions)
    # the optimizer imports its fusions as top-level modules (its folder is put on sys.path)
    module = sys.modules.get("fusion_attention_unet") or importlib.import_module(
        "onnxruntime.transformers.fusion_attention_unet")
    FusionAttentionUnet = module.FusionAttentionUnet
    original = FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        try:
            return original(self, reshape_q, is_torch2)
        except TypeError:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
            if value is None or np.asarray(value).size != 1:
                return 0
            heads = int(np.asarray(value).reshape(-1)[0])
            return heads if heads > 0 else 0

    FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        FusionAttentionUnet.get_num_heads = original


def optimized(path, comp: str, variant: str, fp16: bool, quiet: bool = False) -> tuple[onnx.ModelProto, dict]:
    """The optimizer's rewrite of the graph at `path` (loaded with its external data) and the fused-op counts."""
    import io
    from onnxruntime.transformers.optimizer import optimize_model
    hush = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()  # its own bars
    with _numpy_scalar_shim(), hush:
        m = optimize_model(str(path), model_type=OPTIMIZER_TYPES[comp], num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=fusion_options(comp, variant, fp16), use_gpu=variant == "gpu")
    stats = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    return tidy(m.model), stats
