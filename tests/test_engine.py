"""The engine's FP32 output against diffusers' StableDiffusionPipeline on the same modules and seeds."""
import copy

import numpy as np
import pytest
import torch

from fastsd import optimize
from fastsd.reference import run_reference, to_uint8
from fastsd.schedulers import SCHEDULERS, make_scheduler

STEPS = 4


def _pair(model, prompts, scheduler, steps=STEPS, guidance=7.5, n_img=1, seed=3, negative=None):
    negatives = negative or [""] * len(prompts)
    seeds = [seed + i for i in range(len(prompts) * n_img)]
    ref_images, ref_latents, _, _ = run_reference(copy.deepcopy(model), prompts, negatives,
                                                  num_images_per_prompt=n_img, steps=steps, guidance=guidance,
                                                  height=64, width=64, seeds=seeds, scheduler=scheduler)
    out = optimize(model).generate(prompts, negatives, num_images_per_prompt=n_img, num_inference_steps=steps,
                                   guidance_scale=guidance, height=64, width=64, seed=seed, scheduler=scheduler,
                                   progress=False)
    return ref_images, ref_latents, out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_fp32_equals_diffusers(tiny, scheduler, prediction):
    tiny.scheduler = make_scheduler("pndm", {**tiny.scheduler.config, "prediction_type": prediction})
    ref_images, ref_latents, out = _pair(tiny, ["a red circle", "a blue square"], scheduler)
    # Measured: bit-identical (max abs latent difference 0.0) for every scheduler, both predictions.
    assert torch.allclose(out.latents, ref_latents, atol=1e-6, rtol=0)
    assert np.abs(to_uint8(ref_images).astype(int) - to_uint8(out.images).astype(int)).max() <= 1


def test_negative_prompts_and_images_per_prompt(tiny):
    ref_images, ref_latents, out = _pair(tiny, ["a cat", "a dog"], "ddim", n_img=2, negative=["blurry", "dark"])
    assert len(out.images) == 4 and out.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert out.seeds == [3, 4, 5, 6]
    assert torch.allclose(out.latents, ref_latents, atol=1e-6, rtol=0)


def test_negative_prompt_changes_the_image(tiny):
    eng = optimize(tiny)
    kw = dict(num_inference_steps=STEPS, seed=1, progress=False, scheduler="ddim")
    a = eng.generate("a cat", **kw).latents
    b = eng.generate("a cat", "a dog", **kw).latents
    assert (a - b).abs().max() > 1e-3


def test_per_image_seed_is_independent_of_the_batch(tiny):
    eng = optimize(tiny)
    kw = dict(num_inference_steps=STEPS, progress=False, scheduler="euler-ancestral")
    batch = eng.generate(["a cat", "a dog", "a cow"], seed=10, **kw)
    alone = eng.generate("a dog", seed=11, **kw)
    # equal up to float rounding of batched GEMMs (measured 2e-5 on values near 20)
    assert torch.allclose(batch.latents[1], alone.latents[0], atol=1e-4, rtol=1e-4)
    again = eng.generate(["a cat", "a dog", "a cow"], seed=10, **kw)
    assert torch.equal(batch.latents, again.latents)


def test_guidance_off_at_one_makes_one_unet_call_per_step_at_batch_size(tiny):
    eng = optimize(tiny)
    batches = []
    real = eng.backend.unet
    eng.backend.unet = lambda x, t, e: batches.append(x.shape[0]) or real(x, t, e)
    eng.generate("a cat", num_inference_steps=3, guidance_scale=1.0, seed=0, progress=False, scheduler="ddim")
    assert batches == [1, 1, 1]
    batches.clear()
    eng.generate("a cat", num_inference_steps=3, guidance_scale=7.5, seed=0, progress=False, scheduler="ddim")
    assert batches == [2, 2, 2]  # classifier-free guidance batched as one call


def test_guidance_per_prompt_matches_separate_runs(tiny):
    eng = optimize(tiny)
    kw = dict(num_inference_steps=STEPS, progress=False, scheduler="ddim")
    both = eng.generate(["a cat", "a dog"], guidance_scale=[3.0, 9.0], seed=0, **kw)
    dog = eng.generate("a dog", guidance_scale=9.0, seed=1, **kw)
    assert torch.allclose(both.latents[1], dog.latents[0], atol=1e-4, rtol=1e-4)


def test_embedding_cache_reuses_prompts(tiny):
    eng = optimize(tiny)
    calls = []
    real = eng.backend.encode_text
    eng.backend.encode_text = lambda ids: calls.append(ids.shape[0]) or real(ids)
    eng.generate(["a cat", "a cat"], num_inference_steps=1, seed=0, progress=False)
    eng.generate("a cat", num_inference_steps=1, seed=0, progress=False)
    assert calls == [1, 1]  # "a cat" once and "" once; the second run hits the cache
    assert eng.cache_hits > 0


def test_safety_checker_blacks_out_flagged_images(tiny):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                  image_size=224, patch_size=32, projection_dim=16)
    sc = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        sc.concept_embeds_weights.fill_(-2.0)  # every cosine beats -2: every image is flagged
    tiny.safety_checker, tiny.feature_extractor = sc, CLIPImageProcessor()
    out = optimize(tiny).generate("a cat", num_inference_steps=2, seed=0, progress=False)
    assert out.nsfw_content_detected == [True]
    assert np.asarray(out.images[0]).max() == 0
    tiny.safety_checker = sc
    out = optimize(tiny, safety_checker=False).generate("a cat", num_inference_steps=2, seed=0, progress=False)
    assert out.nsfw_content_detected == [False] and np.asarray(out.images[0]).max() > 0


def test_nan_latents_are_a_clear_error_not_a_black_image(tiny, monkeypatch):
    import torch

    from fastsd import optimize
    from fastsd.engine import NonFiniteOutput
    engine = optimize(tiny)
    real_unet = engine.backend.unet
    monkeypatch.setattr(engine.backend, "unet", lambda *a, **k: real_unet(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteOutput, match="latents became NaN/inf"):
        engine.generate("a cat", num_inference_steps=2, seed=0, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(engine.backend, "decode", lambda latents: torch.full((1, 3, 64, 64), float("inf")))
    with pytest.raises(NonFiniteOutput, match="VAE decode"):
        engine.generate("a cat", num_inference_steps=2, seed=0, progress=False)
