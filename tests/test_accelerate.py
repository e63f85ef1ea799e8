"""fastsd.accelerate(pipe) on tiny diffusers pipelines built from configs: each accelerated pipeline
against the plain one on the same inputs (FP32: the same images and the same latents at every step;
bf16: within verify's bf16 tolerance), the diffusers behaviours a user relies on (save_pretrained byte for
byte; the user's dtype, device and weights untouched; LoRA, slicing, tiling) and deaccelerate. The diffusers
features that change the UNet's computation are in tests/dropin/."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd import InvalidParameter, OptimizeConfig
from fastsd.accelerate import accelerated
from fastsd.kernels import FastSDAttnProcessor
from fastsd.reference import psnr

from accelerate_pipes import KINDS, call_kwargs, make_pipe, run, save_random_lora, tiny_parts


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


def unet_copy(pipe):
    return next(w.copy for w in accelerated(pipe).wrapped if w.role == "unet")


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_same_images_and_step_latents_then_deaccelerate(parts, kind):
    plain, pipe = make_pipe(parts, kind), make_pipe(parts, kind)
    ref_images, ref_steps = run(plain, kind)
    before = processors(pipe)
    assert fastsd.accelerate(pipe, fused_ops=True) is pipe
    assert processors(pipe) == before  # the user's module keeps diffusers' processors
    state = accelerated(pipe)
    assert {type(p) for p in unet_copy(pipe).module.attn_processors.values()} == {FastSDAttnProcessor}
    assert unet_copy(pipe).shares_weights  # fp32 in fp32: the copy holds the user's own tensors
    images, steps = run(pipe, kind)
    assert np.abs(images - ref_images).max() == 0.0  # bit-identical in FP32
    assert len(steps) == len(ref_steps) >= 2  # PNDM: 2 steps are 3 scheduler steps
    for a, b in zip(steps, ref_steps):
        assert torch.equal(a, b)
    assert state.calls["torch"] == len(steps) and state.routes[("VAE", "torch")] >= 1  # fastsd's path ran
    assert fastsd.deaccelerate(pipe) is pipe and accelerated(pipe) is None
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__
    images, _ = run(pipe, kind)
    assert np.abs(images - ref_images).max() == 0.0
    assert fastsd.restore is fastsd.deaccelerate  # the earlier name


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
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32  # the user's modules
    assert report["accelerate"]["dtypes"] == {"unet": "bfloat16", "vae": "bfloat16", "text_encoder": "float32",
                                              **({"controlnet": "bfloat16"} if kind == "controlnet" else {})}
    weight = unet_copy(pipe).module.conv_in.weight
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)  # CPU recipe
    assert pipe.unet.conv_in.weight.is_contiguous()
    assert "cpu_recipe" in report["accelerate"]["applied"]
    assert accelerated(pipe).calls["torch"] >= 2 and accelerated(pipe).calls["plain"] == 0


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


def test_attention_slicing_and_vae_tiling_are_diffusers_own(parts):
    """enable_attention_slicing puts diffusers' SlicedAttnProcessor on the user's UNet, as without fastsd: in
    fp32 the copy runs it (fastsd's kernel steps aside: the same images); in bf16 fastsd's kernel slices."""
    from diffusers.models.attention_processor import SlicedAttnProcessor
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe)
    for p in (plain, pipe):
        p.enable_attention_slicing("max")
    assert processors(pipe) == {SlicedAttnProcessor}
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.array_equal(a, b)
    assert {type(p) for p in unet_copy(pipe).module.attn_processors.values()} == {SlicedAttnProcessor}
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    c, _ = run(pipe, "txt2img")
    procs = unet_copy(pipe).module.attn_processors.values()
    assert all(isinstance(p, FastSDAttnProcessor) and p.slice_size == 1 for p in procs)
    assert psnr(a * 255, c * 255) >= 30.0
    for p in (plain, pipe):
        p.disable_attention_slicing()
    fastsd.accelerate(pipe)
    for p in (plain, pipe):  # tiles of 32 pixels, so the 64-pixel image is decoded in tiles
        p.vae.enable_tiling()
        p.vae.tile_sample_min_size, p.vae.tile_latent_min_size = 32, 4
    ref, _ = run(make_pipe(parts, "txt2img"), "txt2img")
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.abs(a - ref).max() > 0 and np.array_equal(a, b)
    assert accelerated(pipe).wrapped[-1].copy.module.use_tiling  # the user's switch, on the copy


@pytest.mark.parametrize("options", [{}, {"variant": "v1", "max_shard_size": "200KB"},
                                     {"safe_serialization": False, "variant": "v1"}])
def test_save_pretrained_writes_what_diffusers_writes(parts, tmp_path, options):
    """Byte for byte the files diffusers writes for the same arguments, and plain diffusers loads them."""
    from diffusers import StableDiffusionPipeline
    pipe = make_pipe(parts, "txt2img")
    ref, _ = run(pipe, "txt2img")
    pipe.save_pretrained(tmp_path / "plain", **options)
    fastsd.accelerate(pipe, dtype="bf16", device="cpu", fused_ops=True)
    run(pipe, "txt2img")
    pipe.save_pretrained(tmp_path / "accelerated", **options)

    def files(folder):
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
    written, expected = files(tmp_path / "accelerated"), files(tmp_path / "plain")
    assert sorted(written) == sorted(expected) and written == expected
    if "max_shard_size" in options:
        assert any("index.json" in name for name in written)  # the UNet was sharded
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "accelerated", local_files_only=True,
                                                     variant=options.get("variant"))
    loaded.set_progress_bar_config(disable=True)
    images, _ = run(loaded, "txt2img")
    assert np.array_equal(images, ref)


def test_the_users_modules_keep_their_dtype_device_and_weights(parts):
    """Rule: accelerate never changes the dtype or device of the user's components; the profile computes in
    its own precision and the outputs come back in the dtype diffusers returns."""
    pipe = make_pipe(parts, "txt2img")
    tensors = {k: (v.data_ptr(), v.clone()) for k, v in pipe.unet.state_dict().items()}
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    run(pipe, "txt2img")
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float32 and pipe.device.type == "cpu"
    after = pipe.unet.state_dict()
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], v) for k, (ptr, v) in tensors.items())
    sample = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = pipe.unet(sample, 10, torch.randn(1, 77, 32)).sample
        assert out.dtype == torch.float32  # computed in bf16, returned as the fp32 module returns it
        assert pipe.vae.decode(sample).sample.dtype == torch.float32
        assert pipe.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean.dtype == torch.float32
    assert accelerated(pipe).calls["plain"] == 0


def test_a_half_precision_pipeline_keeps_its_precision(parts, caplog):
    """fp16 pipeline: `exact` gives diffusers' fp16 images bit for bit; a configuration asking for bf16 says
    once per module that it keeps fp16, and computes in fp16."""
    plain = make_pipe(parts, "txt2img").to(torch.float16)
    pipe = make_pipe(parts, "txt2img").to(torch.float16)
    ref, _ = run(plain, "txt2img")
    fastsd.accelerate(pipe, profile="exact")
    images, _ = run(pipe, "txt2img")
    assert np.array_equal(images, ref) and pipe.unet.dtype == torch.float16
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        fastsd.accelerate(pipe, dtype="bf16", device="cpu")
        run(pipe, "txt2img")
        images, _ = run(pipe, "txt2img")
    kept = [r.message for r in caplog.records if "not the bfloat16" in r.message]
    assert sorted(m.split()[1] for m in kept) == ["UNet", "VAE"]  # once each
    assert pipe.unet.dtype == torch.float16 and accelerated(pipe).describe()["dtypes"]["unet"] == "float16"
    assert np.array_equal(images, ref)


def test_lora_loaded_through_diffusers_on_an_accelerated_pipeline(parts, tmp_path, caplog):
    """load_lora_weights, a scale in cross_attention_kwargs, set_adapters and fuse_lora on the user's UNet: the
    compute copy is converted again from it (once per change) and gives diffusers' images."""
    pytest.importorskip("peft")
    save_random_lora(parts, tmp_path)
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    base, _ = run(plain, "txt2img")
    fastsd.accelerate(pipe, fused_ops=True)
    first = unet_copy(pipe)
    for p in (plain, pipe):
        p.load_lora_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    assert np.abs(a - base).max() > 0.01 and np.array_equal(a, b)  # the LoRA acts, and alike
    assert unet_copy(pipe) is not first and any("converting it again" in r.message for r in caplog.records)
    for extra in ({"cross_attention_kwargs": {"scale": 0.5}}, {}):
        if not extra:
            for p in (plain, pipe):
                p.set_adapters(["default_0"], [0.3])
        a, _ = run(plain, "txt2img", **extra)
        b, _ = run(pipe, "txt2img", **extra)
        assert np.array_equal(a, b)
    for p in (plain, pipe):
        p.fuse_lora()
        p.unload_lora_weights()
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.array_equal(a, b) and accelerated(pipe).calls["plain"] == 0
    fastsd.deaccelerate(pipe)
    c, _ = run(pipe, "txt2img")
    assert np.array_equal(c, a)


def test_cuda_graph_path_takes_plain_calls_and_logs_why_not_once(parts, caplog):
    """The graph cache with a CPU stand-in for capture: plain UNet calls replay graphs of the compute copy (and
    capture again when the user's module changes, FreeU here); ControlNet residuals run the copy eagerly, with
    one logged reason for the whole run."""
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
        state.graph_factory = lambda fn: CUDAGraphRunner(fn, capture_fn=capture)
        state.wrapped[0].copy = None  # made again on the next call, with its graphs
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastsd"):
            a, _ = run(plain, kind)
            b, _ = run(pipe, kind)
        assert np.array_equal(a, b)
        assert (state.calls["graph"] > 0) == via_graph and (state.calls["torch"] > 0) != via_graph
        why = [r.message for r in caplog.records if "runs eagerly" in r.message]
        assert len(why) == (0 if via_graph else 1)
        if not via_graph:
            assert "down_block_additional_residuals" in why[0]
        else:  # FreeU turned on after the capture: the graphs are captured again, with it
            captures = state.graphs.captures
            for p in (plain, pipe):
                p.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
            a, _ = run(plain, kind)
            b, _ = run(pipe, kind)
            assert np.array_equal(a, b) and state.graphs.captures > captures


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
    with pytest.raises(InvalidParameter, match="device: got 'cuda'.*cpu, the pipeline's device"):
        fastsd.accelerate(pipe, device="cuda")
    with pytest.raises(InvalidParameter, match="keep_original_weights: .*no longer changes"):
        fastsd.accelerate(pipe, keep_original_weights=False)
    assert accelerated(pipe) is None


def test_accelerate_again_changes_the_configuration(parts):
    pipe = make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    run(pipe, "txt2img")
    fastsd.accelerate(pipe, profile="exact", device="cpu")
    state = accelerated(pipe)
    assert state.config.dtype == "fp32" and state.describe()["dtypes"]["unet"] == "float32"
    assert unet_copy(pipe).shares_weights and pipe.unet.conv_in.weight.is_contiguous()


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
        fastsd.accelerate(pipe, profile="fast")  # the engine's `fast` there is openvino; the pipeline's device
    state = accelerated(pipe)
    assert state.config.backend == "torch" and state.config.device == "cpu"
    assert state.describe()["dtypes"]["unet"] == "bfloat16" and pipe.unet.dtype == torch.float32
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
