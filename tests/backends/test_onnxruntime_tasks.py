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
