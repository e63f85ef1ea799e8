"""OpenVINO as module runners inside an accelerated diffusers pipeline: the UNet (4 and 9 input channels) and
the VAE decoder run as OpenVINO compiled models, against the plain FP32 pipeline at verify's tolerance per
dtype; what the graphs cannot take (ControlNet residuals, a LoRA scale, LoRA adapters, weights changed since
the export) runs in torch with one logged reason; `profile="fast"` on an AMX CPU picks these runners."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd import InvalidParameter, OptimizeConfig
from fastsd.accelerate import accelerated
from fastsd.reference import TOLERANCES

from accelerate_pipes import call_kwargs, make_pipe, run, save_random_lora, tiny_parts

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")  # the exporter's parity check runs the graphs on ONNX Runtime

FP32_LEVELS = TOLERANCES["fp32"].max_abs
OV = dict(backend="openvino", device="cpu")


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def levels(a, b) -> float:
    return float(np.abs(a - b).max() * 255)


def reasons(caplog) -> list[str]:
    return [r.message for r in caplog.records if "runs in torch" in r.message]


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_openvino_runners_match_the_plain_pipeline_within_verify_tolerance(parts, kind, dtype):
    """verify_pipeline: the plain FP32 pipeline, then the accelerated one with every UNet call and the decode
    in OpenVINO (the inpainting UNet takes 9 channels), compared at the dtype's tolerance."""
    pipe = make_pipe(parts, kind)
    report = fastsd.verify_pipeline(pipe, config=OptimizeConfig(dtype=dtype, **OV), **call_kwargs(kind))
    assert report["passed"], report["images"]
    assert report["tolerance"]["name"] == dtype
    state = accelerated(pipe)
    assert state.calls["torch"] == 0 and state.calls["runner"] >= 2
    unet = report["accelerate"]["runners"]["unet"]
    assert unet["precision"] == ("bf16" if dtype == "bf16" and unet["native_bf16"] else "f32")
    assert unet["compiled_shapes"] >= 1 and report["accelerate"]["runners"]["vae_decoder"]["compiled_shapes"] == 1
    assert pipe.text_encoder.dtype == torch.float32  # bf16: the CPU recipe's fp32 text encoder, as openvino's
    if dtype == "fp32":
        assert all(r["max_abs"] <= FP32_LEVELS for r in report["images"])
    fastsd.restore(pipe)


def test_controlnet_residuals_and_a_lora_scale_run_in_torch_with_one_reason_each(parts, caplog):
    plain, pipe = make_pipe(parts, "controlnet"), make_pipe(parts, "controlnet")
    fastsd.accelerate(pipe, **OV)
    state = accelerated(pipe)
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "controlnet")
        b, _ = run(pipe, "controlnet")
    assert levels(a, b) <= FP32_LEVELS  # UNet in torch, VAE decoder in OpenVINO
    assert state.calls["runner"] == 0 and state.calls["torch"] > 1
    assert len(reasons(caplog)) == 1 and "down_block_additional_residuals" in reasons(caplog)[0]

    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, **OV)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img", cross_attention_kwargs={"scale": 0.5})
        b, _ = run(pipe, "txt2img", cross_attention_kwargs={"scale": 0.5})
    assert levels(a, b) <= FP32_LEVELS and accelerated(pipe).calls["runner"] == 0
    assert len(reasons(caplog)) == 1 and "cross_attention_kwargs" in reasons(caplog)[0]


def test_lora_adapters_and_changed_weights_run_in_torch(parts, tmp_path, caplog):
    pytest.importorskip("peft")
    save_random_lora(parts, tmp_path)
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    base, _ = run(plain, "txt2img")
    fastsd.accelerate(pipe, **OV)
    run(pipe, "txt2img")  # the runners note the weights they were exported with
    for p in (plain, pipe):
        p.load_lora_weights(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    assert levels(a, base) > 1 and levels(a, b) <= FP32_LEVELS  # the LoRA acts, and alike
    assert any("LoRA adapters are loaded" in m for m in reasons(caplog))
    caplog.clear()
    for p in (plain, pipe):
        p.fuse_lora()  # into the weights, in place: the exported graph no longer holds them
        p.unload_lora_weights()
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    assert levels(a, base) > 1 and levels(a, b) <= FP32_LEVELS
    assert any("weights changed since the export" in m for m in reasons(caplog))


def test_fast_profile_on_amx_runs_the_unet_and_decoder_in_openvino(parts, monkeypatch, caplog):
    from fastsd import profiles
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, profile="fast", device="cpu")
    state = accelerated(pipe)
    assert state.config.backend == "openvino" and state.config.dtype == "bf16"
    assert set(state.runners) == {"unet", "vae_decoder"}
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32  # the torch fallback
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert state.calls["runner"] >= 2 and state.calls["torch"] == 0
    assert np.isfinite(b).all() and levels(a, b) < 255
    fastsd.restore(pipe)
    # a pipeline the export cannot take (fp16 weights): the profile's torch flags, and the reason logged
    half = make_pipe(parts, "txt2img").to(torch.float16)
    with caplog.at_level(logging.INFO, logger="fastsd"):
        fastsd.accelerate(half, profile="fast", device="cpu")
    assert accelerated(half).config.backend == "torch"
    assert any("fp32 on the CPU" in r.message for r in caplog.records)


def test_the_export_is_reused_for_the_same_weights_and_refused_for_another_model(parts, caplog):
    first = make_pipe(parts, "txt2img")
    fastsd.accelerate(first, **OV)
    folder = accelerated(first).runners["unet"].graph.path.parent.parent
    img2img = make_pipe(parts, "img2img")  # another pipeline class over the same weights
    with caplog.at_level(logging.INFO, logger="fastsd"):
        fastsd.accelerate(img2img, **OV)
    assert accelerated(img2img).runners["unet"].graph.path.parent.parent == folder
    assert not any("exporting" in r.message for r in caplog.records)
    inpaint = make_pipe(parts, "inpaint")  # a 9-channel UNet
    with pytest.raises(InvalidParameter, match="onnx_dir: .*in_channels"):
        fastsd.accelerate(inpaint, onnx_dir=folder, **OV)
    assert accelerated(inpaint) is None


def test_what_openvino_cannot_run_is_one_clear_error(parts):
    pipe = make_pipe(parts, "txt2img")
    with pytest.raises(InvalidParameter, match="dtype: .*fp32, bf16"):
        fastsd.accelerate(pipe, backend="openvino", device="cpu", dtype="fp16")
    with pytest.raises(InvalidParameter, match="device: .*cpu"):
        fastsd.accelerate(pipe, backend="openvino", device="cuda")
    assert accelerated(pipe) is None
