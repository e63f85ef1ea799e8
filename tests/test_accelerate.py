"""fastsd.accelerate(pipe) on tiny diffusers pipelines built from configs: each accelerated pipeline
against the plain one on the same inputs (FP32: the same images and the same latents at every step;
bf16: within verify's bf16 tolerance), the diffusers behaviours a user relies on, and restore."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd import InvalidParameter, OptimizeConfig
from fastsd.accelerate import accelerated
from fastsd.kernels import FastSDAttnProcessor

from accelerate_pipes import KINDS, call_kwargs, make_pipe, run, save_random_lora, tiny_parts


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_same_images_and_step_latents_then_restore(parts, kind):
    plain, pipe = make_pipe(parts, kind), make_pipe(parts, kind)
    ref_images, ref_steps = run(plain, kind)
    assert fastsd.accelerate(pipe, fused_ops=True) is pipe
    assert processors(pipe) == {FastSDAttnProcessor}
    images, steps = run(pipe, kind)
    assert np.abs(images - ref_images).max() == 0.0  # bit-identical in FP32
    assert len(steps) == len(ref_steps) >= 2  # PNDM: 2 steps are 3 scheduler steps
    for a, b in zip(steps, ref_steps):
        assert torch.equal(a, b)
    assert fastsd.restore(pipe) is pipe and accelerated(pipe) is None
    assert FastSDAttnProcessor not in processors(pipe)
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__
    images, _ = run(pipe, kind)
    assert np.abs(images - ref_images).max() == 0.0


@pytest.mark.parametrize("kind", ["txt2img", "controlnet"])
def test_output_type_latent_gives_the_same_latents(parts, kind):
    plain, pipe = make_pipe(parts, kind), make_pipe(parts, kind)
    fastsd.accelerate(pipe)
    kw = {**call_kwargs(kind), "output_type": "latent"}
    a = plain(**kw, generator=torch.Generator().manual_seed(5)).images
    b = pipe(**kw, generator=torch.Generator().manual_seed(5)).images
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cpu_recipe_within_verify_tolerance(parts, kind):
    """verify_pipeline: the plain pipeline, then the accelerated one (bf16), compared at the bf16 tolerance."""
    pipe = make_pipe(parts, kind)
    report = fastsd.verify_pipeline(pipe, config=OptimizeConfig(dtype="bf16", device="cpu"), **call_kwargs(kind))
    assert report["passed"], report["images"]
    assert report["tolerance"]["min_psnr"] == 30.0
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32  # the CPU recipe
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "cpu_recipe(text encoder fp32)" in report["accelerate"]["applied"]


def test_diffusers_call_options_keep_working(parts):
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, profile="exact", device="cpu")

    def both(**kw):
        outs = []
        for p in (plain, pipe):
            g = [torch.Generator().manual_seed(s) for s in (7, 8)]
            outs.append(p(num_inference_steps=2, height=64, width=64, generator=g, **kw).images)
        return outs
    a, b = both(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"], output_type="pt")
    assert torch.equal(a, b)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    a, b = both(prompt_embeds=embeds, negative_prompt_embeds=-embeds, latents=latents, guidance_scale=3.0,
                output_type="np")
    assert np.array_equal(a, b)
    pipe.set_progress_bar_config(disable=True, desc="x")
    pipe.to("cpu")
    a, b = both(prompt=["a cat", "a dog"], output_type="np", cross_attention_kwargs={"scale": 1.0})
    assert np.array_equal(a, b)


def test_attention_slicing_keeps_fastsd_processors_and_vae_tiling_works(parts):
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe)
    ref, _ = run(plain, "txt2img")
    pipe.enable_attention_slicing("max")
    procs = {p for p in pipe.unet.attn_processors.values()}
    assert all(isinstance(p, FastSDAttnProcessor) and p.slice_size == 1 for p in procs)
    images, _ = run(pipe, "txt2img")
    assert np.abs(images - ref).max() * 255 <= 0.01  # slicing: same image up to float rounding
    pipe.disable_attention_slicing()
    assert all(p.slice_size is None for p in pipe.unet.attn_processors.values())
    for p in (plain, pipe):  # tiles of 32 pixels, so the 64-pixel image is decoded in tiles
        p.vae.enable_tiling()
        p.vae.tile_sample_min_size, p.vae.tile_latent_min_size = 32, 4
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.abs(a - ref).max() > 0 and np.array_equal(a, b)


def test_save_pretrained_writes_the_original_weights(parts, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe = make_pipe(parts, "txt2img")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref, _ = run(pipe, "txt2img")
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    pipe.save_pretrained(tmp_path)
    assert pipe.unet.dtype == torch.bfloat16  # still accelerated after saving
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    saved = loaded.unet.state_dict()
    assert saved.keys() == before.keys()
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], before[k]) for k in before)
    loaded.set_progress_bar_config(disable=True)
    images, _ = run(loaded, "txt2img")
    assert np.array_equal(images, ref)
    fastsd.restore(pipe)  # the kept originals come back exactly
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_lora_loaded_through_diffusers_on_an_accelerated_pipeline(parts, tmp_path):
    pytest.importorskip("peft")
    save_random_lora(parts, tmp_path)
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    base, _ = run(plain, "txt2img")
    fastsd.accelerate(pipe, fused_ops=True)
    for p in (plain, pipe):
        p.load_lora_weights(tmp_path)
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.abs(a - base).max() > 0.01 and np.array_equal(a, b)  # the LoRA acts, and alike
    a, _ = run(plain, "txt2img", cross_attention_kwargs={"scale": 0.5})
    b, _ = run(pipe, "txt2img", cross_attention_kwargs={"scale": 0.5})
    assert np.array_equal(a, b)
    fastsd.restore(pipe)
    c, _ = run(pipe, "txt2img")
    assert np.array_equal(c, run(plain, "txt2img")[0])


def test_cuda_graph_path_takes_plain_calls_and_logs_why_not_once(parts, caplog):
    """The graph cache with a CPU stand-in for capture: plain UNet calls replay graphs; ControlNet
    residuals go to torch, with one logged reason for the whole run."""
    from fastsd.accelerate import _graph_fn
    from fastsd.kernels import CUDAGraphRunner
    from fastsd.kernels.cuda_graphs import CapturedGraph

    def capture(fn, example):
        static = tuple(t.clone() for t in example)
        out = fn(*static)
        return CapturedGraph(static, lambda: out.copy_(fn(*static)), out)

    for kind, via_graph in (("txt2img", True), ("controlnet", False)):
        plain, pipe = make_pipe(parts, kind), make_pipe(parts, kind)
        fastsd.accelerate(pipe)
        state = accelerated(pipe)
        state.graphs = CUDAGraphRunner(_graph_fn(state, pipe.unet), capture_fn=capture)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastsd"):
            a, _ = run(plain, kind)
            b, _ = run(pipe, kind)
        assert np.array_equal(a, b)
        assert (state.calls["graph"] > 0) == via_graph and (state.calls["torch"] > 0) != via_graph
        why = [r.message for r in caplog.records if "runs in torch" in r.message]
        assert len(why) == (0 if via_graph else 1)
        if not via_graph:
            assert "down_block_additional_residuals" in why[0]


def test_bad_input_is_one_clear_error(parts):
    pipe = make_pipe(parts, "txt2img")
    with pytest.raises(InvalidParameter, match="pipe: .*UNet2DConditionModel"):
        fastsd.accelerate(object())
    with pytest.raises(InvalidParameter, match="accelerate flags"):
        fastsd.accelerate(pipe, turbo=True)
    with pytest.raises(InvalidParameter, match="profile"):
        fastsd.accelerate(pipe, OptimizeConfig(), profile="fast")
    with pytest.raises(InvalidParameter, match="backend: got 'nope'"):
        fastsd.accelerate(pipe, backend="nope")
    with pytest.raises(InvalidParameter, match="dtype"):
        fastsd.accelerate(pipe, dtype="int3")
    assert accelerated(pipe) is None


def test_accelerate_again_changes_the_configuration(parts):
    pipe = make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    fastsd.accelerate(pipe, profile="exact", device="cpu")
    assert pipe.unet.dtype == torch.float32 and accelerated(pipe).config.dtype == "fp32"
    assert pipe.unet.conv_in.weight.is_contiguous()  # the bf16 run's channels_last undone


def test_without_kept_originals_restore_casts_back(parts):
    pipe = make_pipe(parts, "txt2img")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    fastsd.accelerate(pipe, dtype="bf16", device="cpu", keep_original_weights=False)
    assert all(t.originals is None for t in accelerated(pipe).taken)
    fastsd.restore(pipe)
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == torch.float32 and after[k].is_contiguous() for k in before)
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16).float()) for k in before)  # bf16-rounded


def test_a_profile_backend_without_a_module_runner_keeps_the_torch_recipe(parts, monkeypatch, caplog):
    """`fast` on AMX picks openvino, which has module runners (tests/backends/test_openvino_runners.py); a
    backend the profile picks that has none (here: the registry made to lack openvino) gives the profile's
    torch flags, and says so."""
    from fastsd import profiles
    from fastsd import backends as modules
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    monkeypatch.setattr(profiles, "backend_installed", lambda name: True)
    monkeypatch.setattr(modules, "module_runner_names", lambda: ["onnxruntime"])
    pipe = make_pipe(parts, "txt2img")
    with caplog.at_level(logging.INFO, logger="fastsd"):
        fastsd.accelerate(pipe, profile="fast", device="cpu")  # the engine's `fast` there is openvino
    assert accelerated(pipe).config.backend == "torch" and pipe.unet.dtype == torch.bfloat16
    assert any("no module runner" in r.message for r in caplog.records)


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_drop_in_keeps_diffusers_own_few_step_scheduler_and_tiny_vae(parts, tiny_vae_folder, scheduler):
    # the drop-in changes modules, never the pipeline's scheduler: diffusers' own LCMScheduler / TCDScheduler
    # and its own AutoencoderTiny decode, before and after accelerate, at guidance 1
    from fastsd.schedulers import make_scheduler
    from fastsd.tiny_vae import load_tiny_vae
    pipe = make_pipe(parts, "txt2img")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.vae = load_tiny_vae(tiny_vae_folder)
    before = pipe.scheduler
    report = fastsd.verify_pipeline(pipe, prompt="a red circle", num_inference_steps=4, guidance_scale=1.0,
                                    height=64, width=64, seed=3)
    assert report["passed"] and all(r["identical"] for r in report["images"]), report["images"]
    assert pipe.scheduler is before and type(pipe.vae).__name__ == "AutoencoderTiny"
    fastsd.restore(pipe)
