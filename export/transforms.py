"""Graph rewrites after the export: fp16 conversion and ONNX Runtime's transformer optimizer.

fp16: onnxruntime's own float16 converter with keep_io_types=True, so the graph still takes and gives
float32 (inputs, timestep and outputs) and the pipelines around it need no change. (onnxconverter-common's
converter produced a UNet that failed to load: a Cast type mismatch at the time projection.) Nodes named in
`keep_fp32` stay float32 with casts around them: the attention scores of a UNet whose config says
`upcast_attention` (SD 2.1), found by `attention_score_nodes`. Which graphs stay fp32 as a whole (the VAE
of `force_upcast`) is the exporter's decision (exporter.precision_plan).

--optimize: onnxruntime.transformers.optimizer (model types clip / unet / vae), two variants:
  cpu  fusions that have CPU kernels only (no NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu,
       BiasAdd, packed QKV/KV attention): runs on every provider; written as model.onnx
  gpu  every fusion (NHWC convolutions, GroupNorm, fused attention): for the CUDA and TensorRT
       providers only; written as model.gpu.onnx
"""
from __future__ import annotations

import contextlib
import logging
import re

import numpy as np
import onnx

log = logging.getLogger("fastsd")

OPTIMIZER_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
# fusions whose ops have no CPU kernel in onnxruntime (FusionOptions attribute names)
NO_CPU_KERNEL = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                 "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
VARIANTS = ("cpu", "gpu")


def to_fp16(model: onnx.ModelProto, big: bool = False, keep_fp32=()) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    # shape inference works on serialized protos, which cannot pass 2 GB: skip it for big graphs
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=list(keep_fp32) or None)
    if keep_fp32:
        drop_fp16_round_trips(model, set(keep_fp32))
    return tidy(model)


def drop_fp16_round_trips(model: onnx.ModelProto, fp32_nodes: set) -> int:
    """The converter casts every fp32-kept node's output to fp16 and back to fp32 for the next kept node, so
    attention scores still passed through fp16 between MatMul and Softmax (and overflowed there). Where a
    kept node's output goes Cast(fp16) -> Cast(fp32), wire the consumers to the kept node's fp32 output and
    drop the casts left unused. Returns the pairs removed."""
    nodes = list(model.graph.node)
    by_output = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}

    def cast_to(n) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    rename: dict[str, str] = {}
    dropped = set()
    for n in nodes:
        src = by_output.get(n.input[0]) if n.input else None
        if cast_to(n) == onnx.TensorProto.FLOAT and src is not None and cast_to(src) == onnx.TensorProto.FLOAT16 \
                and n.output[0] not in outputs:
            producer = by_output.get(src.input[0])
            if producer is None or producer.name not in fp32_nodes:
                continue  # only the outputs of kept nodes are known to be fp32 before the cast
            rename[n.output[0]] = src.input[0]
            dropped.add(id(n))
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    used = {i for n in nodes if id(n) not in dropped for i in n.input} | outputs
    for n in nodes:
        if cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used:
            dropped.add(id(n))
    kept = [n for n in nodes if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


# The ops of an attention's score path as the TorchScript exporter writes scaled_dot_product_attention
# (Mul by sqrt(scale) on q and k, MatMul, Softmax, MatMul with v; Sqrt/Div compute the scale), named
# ".../attn1/MatMul" etc. in diffusers' transformer blocks; the projections are ".../attn1/to_q/MatMul".
_SCORE_OPS = ("MatMul", "Softmax", "Mul", "Div", "Sqrt")
_SCORE_NODE = re.compile(r"/attn[12]/(MatMul|Softmax|Mul|Div|Sqrt)(_\d+)?$")


def attention_score_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute attention scores, softmax and the weighted sum (not the q/k/v/out
    projections) in a UNet graph: what diffusers' `upcast_attention` computes in fp32."""
    return [n.name for n in model.graph.node if n.op_type in _SCORE_OPS and _SCORE_NODE.search(n.name)]


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
