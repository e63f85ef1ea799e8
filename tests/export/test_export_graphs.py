"""fastsd export on the tiny model: the folder layout other tools read, graphs that load back and match
PyTorch FP32, external data, dynamic and static shapes, fp16, the optimizer's variants."""
import json

import numpy as np
import onnx
import pytest
import torch

from fastsd.export import COMPONENTS, NotAnExport, export_model, load_onnx_model
from fastsd.export import writer
from fastsd.export.graphs import ModelDims, graph_specs, parse_range
from fastsd.export.parity import TOLERANCES, session


def _ort_vs_torch(model, folder, comp, batch, res, file="model.onnx", seed=3):
    """max |onnx - torch| / max |torch| for one graph at one shape."""
    spec = graph_specs()[comp]
    dims = ModelDims.of(model)
    lat = res // dims.vae_scale_factor
    shapes = {"text_encoder": {"input_ids": [batch, 77]},
              "unet": {"sample": [batch, 4, lat, lat], "timestep": [1], "encoder_hidden_states": [batch, 77, 32]},
              "vae_decoder": {"latent_sample": [batch, 4, lat, lat]},
              "vae_encoder": {"sample": [batch, 3, res, res]}}[comp]
    inputs = spec.sample_inputs(dims, shapes, seed=seed)
    with torch.inference_mode():
        ref = spec.module(model)(*inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = session(folder / comp / file).run(None, {k: v.numpy() for k, v in inputs.items()})
    assert got[0].shape == tuple(ref[0].shape)
    return max(float(np.abs(g - r.numpy()).max()) / float(np.abs(r.numpy()).max()) for g, r in zip(got, ref))


def test_layout_matches_what_onnx_pipelines_read(tiny_export):
    out, info = tiny_export
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp in COMPONENTS:
        assert index[comp] == ["diffusers", "OnnxRuntimeModel"]
        assert (out / comp / "model.onnx").is_file() and (out / comp / "config.json").is_file()
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # transformers-4 readers need the first two
        assert (out / "tokenizer" / f).is_file()
    assert json.loads((out / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert json.loads((out / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["in_channels"] == 4 and unet_cfg["sample_size"] == 8 and "time_cond_proj_dim" in unet_cfg

    def io(comp):
        m = onnx.load(str(out / comp / "model.onnx"), load_external_data=False)
        types = {i.name: (i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim)) for i in m.graph.input}
        return types, [o.name for o in m.graph.output]
    te, te_out = io("text_encoder")
    assert te == {"input_ids": (onnx.TensorProto.INT32, 2)} and te_out[0] == "last_hidden_state"
    unet, unet_out = io("unet")
    assert unet["timestep"] == (onnx.TensorProto.FLOAT, 1)  # rank 1: diffusers' ONNX pipeline needs [1]
    assert set(unet) == {"sample", "timestep", "encoder_hidden_states"} and unet_out == ["out_sample"]
    assert io("vae_decoder")[0].keys() == {"latent_sample"}
    assert io("vae_encoder")[1] == ["latent_parameters"]
    # the record verify rebuilds the reference from
    assert info["model"]["spec"] == "tiny" and info["model"]["random_weights"] is True and info["model"]["seed"] == 0
    assert info["opset"] == 17 and info["dtype"] == "fp32" and not info["static"]
    assert json.loads((out / "fastsd_export.json").read_text())["components"] == list(COMPONENTS)
    assert not list(out.glob(".*"))  # no staging folders left


def test_every_graph_matches_pytorch_fp32(tiny_export, _tiny):
    out, info = tiny_export
    results = info["parity"]["results"]
    assert {r["graph"] for r in results} == {f"{c}/model.onnx" for c in COMPONENTS}
    for r in results:
        assert r["passed"] and r["max_rel"] <= TOLERANCES["fp32"] and r["provider"] == "CPUExecutionProvider"
    for comp in COMPONENTS:  # and again, loaded back from the folder, on other inputs
        assert _ort_vs_torch(_tiny, out, comp, 1, 64) < 1e-4


def test_dynamic_shapes_two_resolutions_two_batches(tiny_export, _tiny):
    out, _ = tiny_export
    for comp in ("unet", "vae_decoder", "vae_encoder", "text_encoder"):
        for batch, res in ((1, 64), (3, 128)):
            assert _ort_vs_torch(_tiny, out, comp, batch, res) < 1e-4, (comp, batch, res)


def test_trt_profiles_and_build_commands(tiny_export):
    out, _ = tiny_export
    prof = json.loads((out / "trt_profiles.json").read_text())
    assert set(prof) == set(COMPONENTS)
    # default: batch 1:1:4 images, resolution native/2..2*native snapped to what the UNet divides (64..128)
    assert prof["unet"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert prof["unet"]["encoder_hidden_states"]["max"] == [8, 77, 32]
    assert prof["vae_decoder"]["latent_sample"]["max"] == [4, 4, 16, 16]
    assert prof["text_encoder"]["input_ids"]["opt"] == [1, 77]
    md = (out / "BUILD_TENSORRT.md").read_text()
    assert "trtexec" in md and "--onnx=unet/model.onnx" in md
    assert "--minShapes=sample:1x4x8x8,encoder_hidden_states:1x77x32" in md
    assert "--maxShapes=sample:8x4x16x16,encoder_hidden_states:8x77x32" in md
    assert "timestep:" not in md  # static inputs get no shape flags
    assert "UNION of the weights A and B touch" in md and "#3628" in md  # the LoRA refit route


def test_external_data_written_and_checked_by_path(_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 1)  # every graph counts as "over 2 GB"
    out = tmp_path / "ext"
    info = export_model(_tiny, out, components="unet", progress=False, echo=None)
    g = info["graphs"]["unet"]["model.onnx"]
    assert g["external_data"] == "model.onnx.data"
    data = out / "unet" / "model.onnx.data"
    assert data.stat().st_size > 0.9 * g["tensor_bytes"]
    assert (out / "unet" / "model.onnx").stat().st_size < 0.2 * g["tensor_bytes"]  # weights are not inline
    onnx.checker.check_model(str(out / "unet" / "model.onnx"))
    onnx.shape_inference.infer_shapes_path(str(out / "unet" / "model.onnx"), str(tmp_path / "inferred.onnx"))
    assert info["parity"]["results"][0]["passed"]
    assert _ort_vs_torch(_tiny, out, "unet", 2, 64) < 1e-4


def test_static_export_fixed_shapes(_tiny, tmp_path):
    out = tmp_path / "static"
    info = export_model(_tiny, out, components="unet,vae_decoder", static=True, batch="2", resolution="128",
                        progress=False, echo=None)
    m = onnx.load(str(out / "unet" / "model.onnx"))
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 4, 16, 16]  # 2 images with guidance, 128 px
    prof = json.loads((out / "trt_profiles.json").read_text())
    assert prof["unet"]["sample"]["min"] == prof["unet"]["sample"]["max"] == [4, 4, 16, 16]
    assert "Shapes=" not in (out / "BUILD_TENSORRT.md").read_text()
    assert info["static"] and all(r["passed"] for r in info["parity"]["results"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["unet"] == ["diffusers", "OnnxRuntimeModel"]


def test_fp16_export_loads_and_runs(_tiny, tmp_path):
    out = tmp_path / "fp16"
    info = export_model(_tiny, out, components="unet,vae_decoder", dtype="fp16", opset=18, progress=False, echo=None)
    m = onnx.load(str(out / "unet" / "model.onnx"))
    assert m.opset_import[0].version == 18
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 at the edges
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)  # fp16 inside
    for r in info["parity"]["results"]:
        assert r["passed"] and r["dtype"] == "fp16" and r["max_rel"] <= TOLERANCES["fp16"]
    assert _ort_vs_torch(_tiny, out, "unet", 1, 128) < TOLERANCES["fp16"]


def test_optimize_writes_cpu_safe_and_gpu_variants(_tiny, tmp_path):
    out = tmp_path / "opt"
    info = export_model(_tiny, out, components="unet,text_encoder", optimize=True, progress=False, echo=None)
    unet = info["graphs"]["unet"]
    assert unet["model.onnx"]["variant"] == "cpu" and unet["model.gpu.onnx"]["variant"] == "gpu"
    gpu_ops = {n.op_type for n in onnx.load(str(out / "unet" / "model.gpu.onnx")).graph.node}
    cpu_ops = {n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node}
    assert {"NhwcConv", "GroupNorm"} <= gpu_ops  # fused ops with no CPU kernel: the GPU variant only
    assert not cpu_ops & {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}
    assert unet["model.onnx"]["fused_ops"]  # the CPU-safe variant is fused too (attention, LayerNorm)
    assert isinstance(unet["model.gpu.onnx"]["parity"], str)  # not runnable on CPU: says so
    assert _ort_vs_torch(_tiny, out, "unet", 2, 64) < 1e-4
    assert "--optimize" in (out / "BUILD_TENSORRT.md").read_text()
    with pytest.raises(NotAnExport, match="missing vae_decoder/model.onnx"):
        load_onnx_model(out)  # a partial export is not runnable by the backend, and says why


def test_diffusers_onnx_pipeline_loads_the_export(tiny_export):
    """diffusers' own OnnxStableDiffusionPipeline reads the folder unchanged."""
    import warnings
    from diffusers import OnnxStableDiffusionPipeline
    out, _ = tiny_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = OnnxStableDiffusionPipeline.from_pretrained(str(out), provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_loaded_export_tokenizer_gives_the_same_ids(tiny_export, _tiny):
    out, _ = tiny_export
    model = load_onnx_model(out)
    text = "a photo of a cat"
    assert model.tokenizer(text).input_ids == _tiny.tokenizer(text).input_ids
    assert model.native_size == 64 and model.vae.config.scaling_factor == 0.18215
    assert model.unet.config.in_channels == 4 and model.unet.config.time_cond_proj_dim is None


def test_parse_range():
    r = parse_range("batch", "1:2:4", low=1, high=64)
    assert (r.min, r.opt, r.max) == (1, 2, 4)
    assert parse_range("resolution", "512", low=64, high=2048, multiple=64).max == 512
    for bad in ("4:2:1", "a:b:c", "0:1:2", "1:2"):
        with pytest.raises(ValueError):
            parse_range("batch", bad, low=1, high=64)


def test_scheduler_round_trip_keeps_other_schedulers_defaults(tiny_export, _tiny):
    """A scheduler switched per call (--scheduler euler) must behave as on the original model: keys the
    model's scheduler took by default are not written out (they would override the new class's defaults)."""
    from fastsd.schedulers import make_scheduler
    out, _ = tiny_export
    loaded = load_onnx_model(out).scheduler
    for name in ("euler", "ddim", "dpm++"):
        a, b = make_scheduler(name, loaded.config), make_scheduler(name, _tiny.scheduler.config)
        a.set_timesteps(5)
        b.set_timesteps(5)
        assert a.config.timestep_spacing == b.config.timestep_spacing
        assert torch.equal(a.timesteps, b.timesteps), name


@pytest.mark.slow
def test_full_size_unet_uses_external_data(tmp_path):
    """SD 1.4's UNet in fp32 (3.4 GB) crosses protobuf's 2 GB: written with external data, checked by path."""
    from fastsd.loading import load_model
    model = load_model("sd-1.4", random_weights=True, safety_checker=False)
    out = tmp_path / "sd14"
    info = export_model(model, out, components="unet", batch="1", resolution="256", progress=False, echo=None)
    g = info["graphs"]["unet"]["model.onnx"]
    assert g["external_data"] == "model.onnx.data" and g["tensor_bytes"] > 2**31
    onnx.checker.check_model(str(out / "unet" / "model.onnx"))
    assert info["parity"]["results"][0]["passed"]
