"""`--dtype fp16` exports follow the model's own precision flags: the VAE of `force_upcast` stays fp32, and
the attention scores of a UNet with `upcast_attention` (SD 2.1) are computed in fp32 inside an fp16 graph."""
import copy
from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from fastsd.export import export_model
from fastsd.export.exporter import precision_plan
from fastsd.export.parity import TOLERANCES, session
from fastsd.export.transforms import attention_score_nodes, to_fp16
from fastsd.loading import build_random
from fastsd.presets import PRESETS, TINY


def _fp16_initializers(path) -> int:
    m = onnx.load(str(path))
    return sum(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)


def test_precision_plan_follows_the_configs():
    tiny = build_random(TINY, seed=0)
    assert precision_plan(tiny, "vae_decoder", "fp32")["dtype"] == "fp32"
    assert precision_plan(tiny, "vae_decoder", "fp16")["dtype"] == "fp32"  # diffusers' default: force_upcast
    assert precision_plan(tiny, "unet", "fp16") == {"dtype": "fp16", "upcast_attention": False, "why": ""}
    upcast = build_random(replace(TINY, unet=dict(TINY.unet, upcast_attention=True)), seed=0)
    assert precision_plan(upcast, "unet", "fp16")["upcast_attention"] is True
    assert PRESETS["sd-2.1"].unet["upcast_attention"] is True and "upcast_attention" not in PRESETS["sd-1.5"].unet


def test_vae_graphs_stay_fp32_unless_the_vae_is_fp16_safe(_tiny, tmp_path):
    info = export_model(_tiny, tmp_path / "a", components="vae_decoder,vae_encoder", dtype="fp16", progress=False,
                        echo=None)
    for comp in ("vae_decoder", "vae_encoder"):
        graph = info["graphs"][comp]["model.onnx"]
        assert graph["dtype"] == "fp32" and "force_upcast" in graph["precision_note"]
        assert _fp16_initializers(tmp_path / "a" / comp / "model.onnx") == 0
        assert info["parity"]["results"] and all(r["passed"] for r in info["parity"]["results"])
    assert "force_upcast" in (tmp_path / "a" / "BUILD_TENSORRT.md").read_text()
    fixed = copy.deepcopy(_tiny)  # a fixed fp16 VAE says so in its config
    fixed.vae.register_to_config(force_upcast=False)
    info = export_model(fixed, tmp_path / "b", components="vae_decoder", dtype="fp16", progress=False, echo=None)
    assert info["graphs"]["vae_decoder"]["model.onnx"]["dtype"] == "fp16"
    assert _fp16_initializers(tmp_path / "b" / "vae_decoder" / "model.onnx") > 0


def test_upcast_attention_unet_keeps_scores_in_fp32(tmp_path):
    """SD 2.1's UNet config says upcast_attention: every attention's MatMul -> Softmax -> MatMul runs in fp32
    with no fp16 round trip between them (the converter alone cast each kept node's output to fp16 and back),
    and the rest of the UNet is fp16; the graph still matches PyTorch FP32 within the fp16 tolerance."""
    model = build_random(replace(TINY, unet=dict(TINY.unet, upcast_attention=True)), seed=0)
    info = export_model(model, tmp_path, components="unet", dtype="fp16", progress=False, echo=None)
    graph = info["graphs"]["unet"]["model.onnx"]
    attentions = sum(1 for n, _ in model.unet.named_modules() if n.endswith(("attn1", "attn2")))
    assert graph["dtype"] == "fp16" and graph["fp32_attention_softmax"] == attentions == 8
    m = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    softmaxes = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == attentions
    for sm in softmaxes:
        assert producer[sm.input[0]].op_type == "MatMul", sm.name  # scores straight from the fp32 MatMul
        consumer = next(n for n in m.graph.node if sm.output[0] in n.input)
        assert consumer.op_type == "MatMul", sm.name  # probabilities straight into the fp32 weighted sum
    assert _fp16_initializers(tmp_path / "unet" / "model.onnx") > 0
    assert all(r["passed"] and r["max_rel"] <= TOLERANCES["fp16"] for r in info["parity"]["results"])


def _attention_graph():
    """scaled_dot_product_attention as the TorchScript exporter writes it inside an `attn1` scope."""
    s = "/unet/blk/attn1/"
    nodes = [helper.make_node("Constant", [], ["scale"], name=s + "Constant",
                              value=helper.make_tensor("c", TensorProto.FLOAT, [], [0.5])),
             helper.make_node("Transpose", ["k"], ["kt"], name=s + "Transpose_2", perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["q", "scale"], ["qs"], name=s + "Mul"),
             helper.make_node("Mul", ["kt", "scale"], ["ks"], name=s + "Mul_1"),
             helper.make_node("MatMul", ["qs", "ks"], ["scores"], name=s + "MatMul"),
             helper.make_node("Softmax", ["scores"], ["probs"], name=s + "Softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"], name=s + "MatMul_1")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 16, 8]) for n in ("q", "k", "v")]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 16, 8])]
    return helper.make_model(helper.make_graph(nodes, "attn", io, out), opset_imports=[helper.make_opsetid("", 17)])


def _elem_type(model, name) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    return vi[name].type.tensor_type.elem_type


def test_fp32_scores_survive_logits_beyond_fp16(tmp_path):
    """Logits beyond 65504 overflow fp16. In the plain fp16 graph the scores MatMul writes fp16 (a GPU gives
    inf there; ONNX Runtime's CPU provider runs fp16 MatMul and Softmax in fp32 behind inserted casts, so it
    does not show the overflow: the graph's types are checked instead); with the score nodes kept, the scores
    and softmax are fp32 end to end and the result is softmax(QK^T)V of the fp16-rounded inputs."""
    g = np.random.default_rng(0)
    q = (g.standard_normal((1, 2, 16, 8)) * 150).astype(np.float32)
    k = (q + g.standard_normal(q.shape).astype(np.float32)).astype(np.float32)
    v = g.standard_normal(q.shape).astype(np.float32)
    q16, k16, v16 = (x.astype(np.float16).astype(np.float32) for x in (q, k, v))
    scores = (q16 * 0.5) @ (k16 * 0.5).transpose(0, 1, 3, 2)
    assert np.abs(scores).max() > 65504
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v16
    model = _attention_graph()
    assert attention_score_nodes(model) == [n.name for n in model.graph.node if n.op_type != "Constant"
                                            and n.op_type != "Transpose"]
    results, converted = {}, {}
    for keep in (False, True):
        path = tmp_path / f"keep{keep}.onnx"
        converted[keep] = to_fp16(copy.deepcopy(model), keep_fp32=attention_score_nodes(model) if keep else ())
        onnx.save(converted[keep], str(path))
        results[keep] = session(path).run(None, {"q": q, "k": k, "v": v})[0]
    softmax_in = {keep: next(n.input[0] for n in m.graph.node if n.op_type == "Softmax") for keep, m in converted.items()}
    assert _elem_type(converted[False], softmax_in[False]) == TensorProto.FLOAT16
    assert _elem_type(converted[True], softmax_in[True]) == TensorProto.FLOAT
    assert np.isfinite(results[True]).all() and np.abs(results[True] - want).max() < 2e-2


def test_fp16_unet_without_upcast_attention_is_fp16_throughout(_tiny, tmp_path):
    info = export_model(_tiny, tmp_path, components="unet", dtype="fp16", progress=False, echo=None)
    graph = info["graphs"]["unet"]["model.onnx"]
    assert graph["dtype"] == "fp16" and "fp32_attention_softmax" not in graph and "precision_note" not in graph
    m = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    # the converter's own fp32 islands aside, attention softmax reads fp16 scores through no cast
    assert all(producer[n.input[0]].op_type == "MatMul" for n in m.graph.node if n.op_type == "Softmax")
