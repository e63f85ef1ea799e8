"""The few-step samplers (LCM, TCD), a model folder's own scheduler config (SD-Turbo's), eta and guidance off:
the engine in FP32 against diffusers' StableDiffusionPipeline on the same modules and seeds."""
import copy
import json

import numpy as np
import pytest
import torch

from fastsd import optimize
from fastsd.errors import InvalidParameter
from fastsd.loading import load_model
from fastsd.reference import psnr, run_reference, to_uint8
from fastsd.schedulers import FEW_STEP, make_scheduler


def _compare(model, scheduler, steps, guidance, eta=0.0, seed=3, prompts=("a red circle", "a blue square")):
    prompts = list(prompts)
    seeds = [seed + i for i in range(len(prompts))]
    ref_images, ref_latents, _, _ = run_reference(copy.deepcopy(model), prompts, [""] * len(prompts),
                                                  num_images_per_prompt=1, steps=steps, guidance=guidance,
                                                  height=64, width=64, seeds=seeds, scheduler=scheduler, eta=eta)
    out = optimize(model).generate(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                                   seed=seed, scheduler=scheduler, progress=False, eta=eta)
    a, b = to_uint8(ref_images), to_uint8(out.images)
    return (out.latents - ref_latents).abs().max().item(), min(psnr(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scheduler", FEW_STEP)
@pytest.mark.parametrize("steps, guidance", [(4, 1.0), (2, 1.5), (8, 0.0)])
def test_few_step_samplers_equal_diffusers(tiny, scheduler, steps, guidance):
    # Measured: bit-identical latents (0.0) and images (PSNR inf) for lcm and tcd, with and without guidance.
    err, db = _compare(tiny, scheduler, steps, guidance)
    assert err <= 1e-6 and db >= 45, (err, db)


def test_tcd_gamma_is_eta_and_defaults_to_the_pipelines_zero(tiny):
    # diffusers' pipeline passes eta=0.0 unless told; TCDScheduler.step's own default (0.3) never applies
    err, db = _compare(copy.deepcopy(tiny), "tcd", 4, 1.0, eta=0.3)
    assert err <= 1e-6 and db >= 45, (err, db)
    eng = optimize(tiny)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, seed=0, scheduler="tcd", progress=False)
    assert not torch.equal(eng.generate("a cat", **kw).latents, eng.generate("a cat", eta=0.3, **kw).latents)


def test_lcm_timesteps_are_diffusers_own(tiny):
    sched = make_scheduler("lcm", tiny.scheduler.config)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]  # original_inference_steps 50: k = 20
    assert sched.config.original_inference_steps == 50


@pytest.mark.parametrize("scheduler", FEW_STEP)
def test_guidance_at_one_makes_one_unet_call_per_step_at_the_batch_size(tiny, scheduler):
    eng = optimize(tiny)
    batches = []
    real = eng.backend.unet
    eng.backend.unet = lambda x, t, e, **kw: batches.append(x.shape[0]) or real(x, t, e, **kw)
    eng.generate(["a cat", "a dog"], num_inference_steps=4, guidance_scale=1.0, seed=0, scheduler=scheduler,
                 progress=False)
    assert batches == [2, 2, 2, 2]


def test_bad_steps_and_eta_are_clear_errors(tiny):
    eng = optimize(tiny)
    with pytest.raises(InvalidParameter, match=r"steps.*\[1, 50\] with the lcm scheduler"):
        eng.generate("a cat", num_inference_steps=51, scheduler="lcm", progress=False)
    with pytest.raises(InvalidParameter, match="eta.*ddim and tcd only"):
        eng.generate("a cat", num_inference_steps=2, scheduler="pndm", eta=0.5, progress=False)
    with pytest.raises(InvalidParameter, match=r"eta.*\[0, 1\]"):
        eng.generate("a cat", num_inference_steps=2, scheduler="tcd", eta=1.5, progress=False)


def turbo_folder(model, path, scheduler_class: str):
    """The tiny model saved as SD-Turbo (Euler, timestep_spacing trailing) and SDXL-Turbo (Euler-ancestral,
    trailing) ship their scheduler: the folder's own scheduler_config.json is the only place that says so."""
    import diffusers
    model.scheduler = getattr(diffusers, scheduler_class).from_config(model.scheduler.config,
                                                                       timestep_spacing="trailing")
    model.to_pipeline(with_safety_checker=False).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("scheduler_class, name", [("EulerDiscreteScheduler", "euler"),
                                                   ("EulerAncestralDiscreteScheduler", "euler-ancestral")])
@pytest.mark.parametrize("steps", [1, 4])
def test_a_folders_own_scheduler_config_is_honoured_turbo(_tiny, tmp_path, scheduler_class, name, steps):
    from diffusers import StableDiffusionPipeline
    folder = turbo_folder(copy.deepcopy(_tiny), tmp_path / "tiny-turbo", scheduler_class)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == scheduler_class and cfg["timestep_spacing"] == "trailing"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle", "a cat"], num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
               generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    eng = optimize(load_model(str(folder), safety_checker=False))
    assert eng.describe()["scheduler"] == name
    calls = []
    real = eng.backend.unet
    eng.backend.unet = lambda x, t, e, **kw: calls.append((x.shape[0], int(t))) or real(x, t, e, **kw)
    out = eng.generate(["a red circle", "a cat"], num_inference_steps=steps, guidance_scale=0.0, seed=5,
                       progress=False)
    assert calls[0] == (2, 999)  # trailing spacing starts at the last training timestep; batch 2, no guidance
    a, b = to_uint8(ref), to_uint8(out.images)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert min(psnr(x, y) for x, y in zip(a, b)) >= 45


def test_lcm_distilled_unet_takes_the_guidance_embedding(tiny):
    # an LCM-distilled UNet (time_cond_proj_dim) reads w = guidance - 1 as an embedding, no classifier-free guidance
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    tiny.unet = UNet2DConditionModel.from_config(tiny.unet.config, time_cond_proj_dim=16).eval()
    assert tiny.unet.config.time_cond_proj_dim == 16
    for g in (1.0, 8.0):
        err, db = _compare(copy.deepcopy(tiny), "lcm", 4, g)
        assert err <= 1e-6 and db >= 45, (g, err, db)
    eng = optimize(copy.deepcopy(tiny))
    kw = dict(num_inference_steps=2, seed=0, scheduler="lcm", progress=False)
    assert not torch.equal(eng.generate("a cat", guidance_scale=1.0, **kw).latents,
                           eng.generate("a cat", guidance_scale=8.0, **kw).latents)


def test_an_lcm_distilled_folder_equals_diffusers_lcm_pipeline(_tiny, tmp_path):
    # a folder as LCM-distilled checkpoints ship (SimianLuo/LCM_Dreamshaper_v7): LatentConsistencyModelPipeline,
    # LCMScheduler, a UNet with time_cond_proj_dim; fastsd loads it and matches diffusers' own LCM pipeline
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    model = copy.deepcopy(_tiny)
    torch.manual_seed(2)
    model.unet = UNet2DConditionModel.from_config(model.unet.config, time_cond_proj_dim=16).eval()
    model.scheduler = LCMScheduler.from_config(model.scheduler.config)
    pipe = LatentConsistencyModelPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                          unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "lcm", safe_serialization=True)
    assert json.loads((tmp_path / "lcm" / "model_index.json").read_text())["_class_name"] == \
        "LatentConsistencyModelPipeline"
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(tmp_path / "lcm"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle", "a cat"], num_inference_steps=4, guidance_scale=8.5, height=64, width=64,
               generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="np").images
    eng = optimize(load_model(str(tmp_path / "lcm"), safety_checker=False))
    assert eng.describe()["scheduler"] == "lcm"
    out = eng.generate(["a red circle", "a cat"], num_inference_steps=4, guidance_scale=8.5, seed=5, progress=False,
                       output_type="np").images
    assert np.abs(out - ref).max() * 255 <= 1
