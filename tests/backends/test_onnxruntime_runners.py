"""ONNX Runtime as module runners inside an accelerated diffusers pipeline: the exported UNet and VAE
decoder take the calls they can, and what they cannot (ControlNet residuals, LoRA adapters, weights
changed since the export) runs in torch, with one logged reason."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd import InvalidParameter
from fastsd.accelerate import accelerated
from fastsd.reference import TOLERANCES

from accelerate_pipes import make_pipe, run, tiny_parts

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

FP32_LEVELS = TOLERANCES["fp32"].max_abs


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def onnx_dir(parts):
    """accelerate exports the pipeline itself when given no onnx_dir; the other tests reuse that export."""
    pipe = make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, backend="onnxruntime", device="cpu")
    folder = accelerated(pipe).runners["unet"].graph.path.parent.parent
    assert folder.name.startswith("fastsd-accelerate-onnx-")
    yield folder
    import shutil
    shutil.rmtree(folder)  # the temporary export accelerate wrote


def levels(a, b) -> float:
    return float(np.abs(a - b).max() * 255)


def test_text_to_image_runs_on_the_graphs(parts, onnx_dir):
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, backend="onnxruntime", device="cpu", onnx_dir=onnx_dir)
    state = accelerated(pipe)
    assert state.describe()["runners"]["unet"]["providers"] == ["CPUExecutionProvider"]
    a, steps_a = run(plain, "txt2img")
    b, steps_b = run(pipe, "txt2img")
    assert levels(a, b) <= FP32_LEVELS
    assert state.calls["runner"] == len(steps_b) and state.calls["torch"] == 0
    for x, y in zip(steps_a, steps_b):
        assert torch.allclose(x, y, atol=1e-3)


def test_controlnet_residuals_and_lora_fall_back_to_torch_with_one_reason(parts, onnx_dir, caplog):
    plain, pipe = make_pipe(parts, "controlnet"), make_pipe(parts, "controlnet")
    fastsd.accelerate(pipe, backend="onnxruntime", device="cpu", onnx_dir=onnx_dir)
    state = accelerated(pipe)
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "controlnet")
        b, _ = run(pipe, "controlnet")
    assert levels(a, b) <= FP32_LEVELS  # UNet in torch, VAE decoder in ONNX Runtime
    assert state.calls["runner"] == 0 and state.calls["torch"] > 1
    why = [r.message for r in caplog.records if "runs in torch" in r.message]
    assert len(why) == 1 and "down_block_additional_residuals" in why[0]


def test_weights_changed_since_export_run_in_torch(parts, onnx_dir, caplog):
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, backend="onnxruntime", device="cpu", onnx_dir=onnx_dir)
    run(pipe, "txt2img")  # the runner notes the weights it was exported with
    with torch.no_grad():
        for p in (plain, pipe):
            p.unet.conv_out.weight.data.mul_(0.5)  # as peft's fuse_lora does: in place, through .data
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    assert levels(a, b) <= FP32_LEVELS
    assert any("weights changed since the export" in r.message for r in caplog.records)


def test_an_export_of_another_model_is_refused(parts, onnx_dir):
    pipe = make_pipe(parts, "inpaint")  # a 9-channel UNet
    with pytest.raises(InvalidParameter, match="onnx_dir: .*in_channels"):
        fastsd.accelerate(pipe, backend="onnxruntime", device="cpu", onnx_dir=onnx_dir)
    assert accelerated(pipe) is None


def test_providers_for_cuda_1_name_device_1_for_the_backend_and_the_runners(parts, onnx_dir, monkeypatch):
    """The runners' sessions get the backend's providers and options (one function builds both), so cuda:1
    runs on GPU 1, not GPU 0. No GPU is needed to build the lists: the sessions are captured, not opened."""
    from types import SimpleNamespace

    from fastsd.backends.onnxruntime import backend as ort_backend
    from fastsd.backends.onnxruntime import runners as ort_runners
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    names, options = ort_backend.session_providers([ort_backend.TRT, cuda, cpu], "unet", "cuda:1",
                                                   export_dtype="fp32")
    assert names == [ort_backend.TRT, cuda, cpu]
    assert options[0]["device_id"] == "1" and options[1] == {"device_id": "1"} and options[2] == {}
    assert ort_backend.session_providers([cuda, cpu], "unet", "cuda", export_dtype="fp32")[1] == [{}, {}]

    opened = []

    class Captured:
        def __init__(self, ort, name, path, providers, provider_options, threads):
            opened.append((name, providers, provider_options))
            self.path, self.providers = path, providers
    monkeypatch.setattr(ort_runners, "choose_providers", lambda ort, device: [cuda, cpu])
    monkeypatch.setattr(ort_runners, "_Graph", Captured)
    pipe = make_pipe(parts, "txt2img")
    runners = ort_runners.module_runners(pipe, SimpleNamespace(dtype="fp32", device="cuda:1"),
                                                      onnx_dir=onnx_dir)
    assert set(runners) == {"unet", "vae_decoder"}
    assert opened == [(comp, [cuda, cpu], [{"device_id": "1"}, {}]) for comp in ("unet", "vae_decoder")]
