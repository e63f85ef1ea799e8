"""The onnxruntime backend runs image-to-image and inpainting from an export (its vae_encoder graph, and a
9-channel UNet graph for an inpainting model) and passes `verify --task` against diffusers' FP32 pipelines."""
import json

import onnx
import pytest
import torch

from fastsd import optimize
from fastsd.errors import ModelLoadError
from fastsd.export import export_model, load_onnx_model, reference_model
from fastsd.loading import build_random
from fastsd.optimize import OptimizeConfig
from fastsd.presets import PRESETS
from fastsd.verify import sample_inputs, verify


@pytest.fixture(scope="module")
def export9(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort9") / "tiny-inpainting-onnx"
    export_model(build_random(PRESETS["tiny-inpainting"], seed=0), out, progress=False, echo=None)
    return out


@pytest.fixture(scope="module")
def export4(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort4") / "tiny-onnx"
    export_model(_tiny, out, progress=False, echo=None)
    return out


def test_nine_channel_unet_graph_and_profiles(export9):
    graph = onnx.load(str(export9 / "unet" / "model.onnx"), load_external_data=False)
    sample = next(i for i in graph.graph.input if i.name == "sample")
    assert sample.type.tensor_type.shape.dim[1].dim_value == 9
    assert json.loads((export9 / "unet" / "config.json").read_text())["in_channels"] == 9
    profiles = json.loads((export9 / "trt_profiles.json").read_text())
    assert profiles["unet"]["sample"]["opt"][1] == 9
    enc = onnx.load(str(export9 / "vae_encoder" / "model.onnx"), load_external_data=False)
    out = enc.graph.output[0]
    # what Optimum's ORT img2img/inpaint pipelines read: mean and log-variance, [B, 2 * latent channels, h, w]
    assert out.name == "latent_parameters" and out.type.tensor_type.shape.dim[1].dim_value == 8


@pytest.mark.parametrize("task", ["inpaint"])
def test_verify_inpaint_on_a_9_channel_export(export9, task):
    onnx_model = load_onnx_model(export9)
    ref = reference_model(onnx_model, safety_checker=False)
    report, *_ = verify(ref, OptimizeConfig(backend="onnxruntime", device="cpu", safety_checker=False), steps=4,
                        scheduler="euler", engine_model=onnx_model, task=task)
    assert report["passed"], report["images"]
    assert all(r["max_abs"] <= 2 for r in report["images"])


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_verify_tasks_on_a_4_channel_export(export4, task):
    onnx_model = load_onnx_model(export4)
    ref = reference_model(onnx_model, safety_checker=False)
    report, _, result, _ = verify(ref, OptimizeConfig(backend="onnxruntime", device="cpu", safety_checker=False),
                                  steps=4, scheduler="ddim", engine_model=onnx_model, task=task, strength=0.75)
    assert report["passed"], report["images"]
    assert result.timings["vae_encode"] > 0


def test_export_without_vae_encoder_says_what_to_do(_tiny, tmp_path):
    out = tmp_path / "no-enc"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    eng = optimize(load_onnx_model(out), OptimizeConfig(backend="onnxruntime", device="cpu"))
    image, _ = sample_inputs("img2img", 64, 64)
    with pytest.raises(ModelLoadError, match="no vae_encoder graph.*--components"):
        eng.generate("a cat", image=image, num_inference_steps=2, progress=False)
    assert torch.isfinite(eng.generate("a cat", num_inference_steps=2, progress=False, seed=0).latents).all()


def test_vae_encoder_session_has_its_own_tensorrt_profile_and_cache(export4, pretend_gpu):
    """The vae_encoder session (opened on first image-to-image use) gets the encoder's image-sized profile
    and engine cache, chosen like every other graph's, never the UNet's."""
    engine = optimize(load_onnx_model(export4), backend="onnxruntime", device="cuda:1")
    engine.backend.encode_image(torch.zeros(1, 3, 64, 64))
    opened = {m["path"].split("/")[-2]: m for m in pretend_gpu.made}
    assert set(opened) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    profiles = json.loads((export4 / "trt_profiles.json").read_text())
    for comp, m in opened.items():
        trt = m["options"][m["providers"].index("TensorrtExecutionProvider")]
        assert trt["trt_engine_cache_path"].endswith(f"trt_cache/{comp}") and trt["device_id"] == "1"
        name = next(iter(k for k in profiles[comp] if k != "timestep"))
        assert trt["trt_profile_opt_shapes"].startswith(f"{name}:{'x'.join(map(str, profiles[comp][name]['opt']))}")
    enc = opened["vae_encoder"]["options"][0]["trt_profile_opt_shapes"]
    assert enc.startswith("sample:") and enc.split(":")[1].split("x")[1] == "3"  # an image, not the UNet's latents


def test_optimized_vae_encoder_is_not_given_to_tensorrt(export4, tmp_path, pretend_gpu):
    """As for the other graphs: an --optimize graph holds onnxruntime contrib ops, so CUDA, not TensorRT
    (stand-in: the plain export with a model.gpu.onnx beside each graph)."""
    import shutil
    out = tmp_path / "opt"
    shutil.copytree(export4, out, ignore=shutil.ignore_patterns("trt_cache"))
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        shutil.copy(out / comp / "model.onnx", out / comp / "model.gpu.onnx")
    engine = optimize(load_onnx_model(out), backend="onnxruntime", device="cuda")
    engine.backend.encode_image(torch.zeros(1, 3, 64, 64))
    assert len(pretend_gpu.made) == 4
    assert all(m["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] for m in pretend_gpu.made)
