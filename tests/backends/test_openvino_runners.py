"""OpenVINO as module runners inside an accelerated diffusers pipeline: the UNet (4 and 9 input channels) and
the VAE decoder run as OpenVINO compiled models, against the plain FP32 pipeline at verify's tolerance per
dtype; what the graphs cannot take (ControlNet residuals, a LoRA scale, LoRA adapters, weights changed since
the export, FreeU, other attention processors, IP-Adapter, PAG, hooks) runs in torch with one logged reason;
`profile="fast"` on an AMX CPU picks these runners, with any optional component absent, and stays consistent
with itself where a call mixes graphs and torch (VAE slicing, tiling, custom sigmas)."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd import InvalidParameter, OptimizeConfig
from fastsd.accelerate import accelerated
from diffusers.models.attention_processor import AttnProcessor2_0

from fastsd.reference import TOLERANCES, psnr

from accelerate_pipes import (call_kwargs, image_embeds, ip_adapter_state, make_pipe, run, save_random_lora,
                              tiny_parts)

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
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32  # the user's modules stay as they were
    if dtype == "fp32":
        assert all(r["max_abs"] <= FP32_LEVELS for r in report["images"])
    fastsd.deaccelerate(pipe)


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
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32  # the user's modules stay as they were
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert state.calls["runner"] >= 2 and state.calls["torch"] == 0
    assert all(w.copy is None for w in state.wrapped)  # no torch copy made: nothing needed one
    assert np.isfinite(b).all() and levels(a, b) < 255
    fastsd.deaccelerate(pipe)
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


# -- the drop-in under `fast` on an AMX CPU: optional parts, features, mixed paths ---------------------------
@pytest.fixture
def amx(monkeypatch):
    from fastsd import profiles
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))


BF16_PSNR = TOLERANCES["bf16"].min_psnr


def db(a, b) -> float:
    return psnr(a * 255, b * 255)


def test_fast_takes_a_pipeline_without_text_encoder_tokenizer_or_safety_checker(parts, amx):
    """prompt_embeds-only use: the export and its cache key need no text encoder; the runners still run."""
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    for p in (plain, pipe):
        p.register_modules(text_encoder=None, tokenizer=None, safety_checker=None, image_encoder=None)
    fastsd.accelerate(pipe, profile="fast")
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    a, b = (p(prompt_embeds=embeds, negative_prompt_embeds=-embeds, num_inference_steps=2, height=64, width=64,
              generator=torch.Generator().manual_seed(0), output_type="np").images for p in (plain, pipe))
    state = accelerated(pipe)
    assert state.config.backend == "openvino" and state.calls["runner"] >= 2
    assert state.routes[("VAE", "runner")] == 1 and db(a, b) >= BF16_PSNR


class Counting(AttnProcessor2_0):
    calls = 0

    def __call__(self, *args, **kwargs):
        Counting.calls += 1
        return super().__call__(*args, **kwargs)


def _freeu(p):
    p.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)


def _custom(p):
    p.unet.set_attn_processor({n: Counting() if "mid_block" in n else AttnProcessor2_0()
                               for n in p.unet.attn_processors})


def _layer_skip(p):
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    apply_layer_skip(p.unet, LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks",
                                             skip_attention=True))


def _ip_adapter(p):
    p.unet._load_ip_adapter_weights([ip_adapter_state(p.unet)])


# feature -> (set it up on a pipeline, call arguments, the path the UNet takes, a word of the logged reason)
FEATURES = {
    "freeu": (_freeu, {}, "torch", "FreeU is on"),
    "custom processor": (_custom, {}, "torch", "Counting"),
    "layer skipping": (_layer_skip, {}, "plain", "layer_skip"),
    "ip-adapter": (_ip_adapter, {"ip_adapter_image_embeds": image_embeds()}, "torch", "submodules changed"),
    "lora scale": (lambda p: None, {"cross_attention_kwargs": {"scale": 0.5}}, "torch", "cross_attention_kwargs"),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_what_changes_the_unets_computation_leaves_the_graph_for_that_call(parts, amx, caplog, feature):
    """Never a silently different image: a feature the OpenVINO graph does not have makes the UNet run in
    torch (the bf16 compute copy) or as the user's module (hooks), says why once, and gives the plain
    pipeline's image with the feature within the bf16 tolerance; without the feature the graph is back."""
    setup, kwargs, path, word = FEATURES[feature]
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, profile="fast")
    state = accelerated(pipe)
    without, _ = run(pipe, "txt2img")
    for p in (plain, pipe):
        setup(p)
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img", **kwargs)
        counted = Counting.calls
        b, _ = run(pipe, "txt2img", **kwargs)
    assert state.calls[path] >= 2 and state.calls["runner"] == 3  # the first call only
    assert db(a, b) >= BF16_PSNR
    if feature == "custom processor":  # same maths as the graph's: the user's processor itself ran
        assert Counting.calls > counted
    elif feature != "lora scale":  # the feature changes the image, so the graph alone could not have made b
        assert levels(a, without) > 1
    said = [m for m in caplog.messages if "UNet" in m and word in m]
    assert len(said) == 1, caplog.messages


def test_pag_leaves_the_graph_for_its_calls_only(parts, amx):
    import copy
    import diffusers
    m = parts["model"]

    def pag():
        p = diffusers.StableDiffusionPAGPipeline(
            vae=copy.deepcopy(m.vae), text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=copy.deepcopy(m.unet),
            scheduler=copy.deepcopy(m.scheduler), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, pag_applied_layers=["mid"])
        p.set_progress_bar_config(disable=True)
        return p
    plain, pipe = pag(), pag()
    fastsd.accelerate(pipe, profile="fast")
    state = accelerated(pipe)
    a, _ = run(plain, "txt2img", pag_scale=3.0)
    b, _ = run(pipe, "txt2img", pag_scale=3.0)
    assert db(a, b) >= BF16_PSNR and state.calls["torch"] == 3 and state.calls["runner"] == 0
    run(pipe, "txt2img", pag_scale=0.0)
    assert state.calls["runner"] == 3


def test_the_fast_profile_is_consistent_with_itself_on_mixed_paths(parts, amx):
    """VAE slicing: the decoder graph one latent at a time (the same image); tiling: the decode in torch,
    changing the image as it does in plain diffusers (on the tiny model 32-pixel tiles alone move it to
    ~19 dB) and within the bf16 tolerance of diffusers' tiled image; custom sigmas (Align-Your-Steps
    style, fractional timesteps): the graph takes them."""
    from diffusers import EulerDiscreteScheduler
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, profile="fast")
    state = accelerated(pipe)
    two = {"prompt": ["a red circle", "a blue cube"], "negative_prompt": None}
    base, _ = run(pipe, "txt2img", **two)
    pipe.vae.enable_slicing()
    sliced, _ = run(pipe, "txt2img", **two)
    assert db(base, sliced) >= 60 and state.routes[("VAE", "runner")] == 2 and state.routes[("VAE", "torch")] == 0
    pipe.vae.disable_slicing()
    ref, _ = run(plain, "txt2img")
    fast, _ = run(pipe, "txt2img")
    for p in (plain, pipe):
        p.vae.enable_tiling()
        p.vae.tile_sample_min_size, p.vae.tile_latent_min_size = 32, 4
    ref_tiled, _ = run(plain, "txt2img")
    fast_tiled, _ = run(pipe, "txt2img")
    assert state.routes[("VAE", "torch")] == 1 and db(ref_tiled, fast_tiled) >= BF16_PSNR
    assert abs(db(ref, ref_tiled) - db(fast, fast_tiled)) < 1.0  # tiling moves both alike
    for p in (plain, pipe):
        p.vae.disable_tiling()
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    sigmas = {"sigmas": [14.6, 6.0, 2.5, 0.9, 0.03], "num_inference_steps": None}
    runner_calls = state.calls["runner"]
    a, _ = run(plain, "txt2img", **sigmas)
    b, steps = run(pipe, "txt2img", **sigmas)
    assert state.calls["runner"] - runner_calls == len(steps) >= 4 and db(a, b) >= BF16_PSNR
