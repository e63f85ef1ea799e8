"""Image-to-image and inpainting (fastsd.tasks) against diffusers' FP32 StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same modules, images and seeds; and their input checks."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastsd import optimize
from fastsd.errors import InvalidParameter
from fastsd.loading import build_random
from fastsd.presets import PRESETS
from fastsd.reference import run_reference, to_uint8
from fastsd.schedulers import SCHEDULERS, make_scheduler

STEPS = 4
# every scheduler with both predictions is `-m slow`; the default suite runs a spread of them
FULL = [(s, p) for s in SCHEDULERS for p in ("epsilon", "v_prediction")]
QUICK = [("pndm", "epsilon"), ("euler-ancestral", "v_prediction"), ("dpm++", "epsilon"), ("lms", "v_prediction")]
GRID = [pytest.param(*c, marks=[] if c in QUICK else [pytest.mark.slow]) for c in FULL]


def drawn(colour=(200, 30, 30), size=64):
    im = Image.new("RGB", (size, size), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return im


def corner_mask(size=64):
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((0, 0, size // 2 - 1, size // 2 - 1), fill=255)
    return m


@pytest.fixture(scope="module")
def _tiny9():
    return build_random(PRESETS["tiny-inpainting"], seed=0)


@pytest.fixture
def tiny9(_tiny9):
    return copy.deepcopy(_tiny9)


def _pair(model, scheduler, *, mask: bool, strength: float, prediction="epsilon", guidance=7.5):
    model.scheduler = make_scheduler("pndm", {**model.scheduler.config, "prediction_type": prediction})
    prompts, images = ["a red circle", "a blue square"], [drawn(), drawn((30, 200, 30))]
    masks = [corner_mask(), corner_mask()] if mask else None
    ref_images, ref_latents, _, _ = run_reference(
        copy.deepcopy(model), prompts, ["", ""], num_images_per_prompt=1, steps=STEPS, guidance=guidance,
        height=64, width=64, seeds=[3, 4], scheduler=scheduler, image=images, mask_image=masks, strength=strength)
    out = optimize(model).generate(prompts, num_inference_steps=STEPS, guidance_scale=guidance, seed=3,
                                   scheduler=scheduler, progress=False, image=images, mask_image=masks,
                                   strength=strength)
    px = np.abs(to_uint8(ref_images).astype(int) - to_uint8(out.images).astype(int)).max()
    return (out.latents - ref_latents).abs().max().item(), px, out


@pytest.mark.parametrize("scheduler, prediction", GRID)
def test_img2img_equals_diffusers(tiny, scheduler, prediction):
    lat, px, out = _pair(tiny, scheduler, mask=False, strength=0.6, prediction=prediction)
    # Measured: bit-identical (0.0) for every scheduler and both predictions
    assert lat <= 1e-6 and px <= 1
    assert "vae_encode" in out.timings


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("scheduler, prediction", GRID)
def test_inpaint_4_channel_equals_diffusers(tiny, scheduler, prediction, strength):
    lat, px, _ = _pair(tiny, scheduler, mask=True, strength=strength, prediction=prediction)
    # Measured: max latent difference 3e-6..2e-5 (float rounding), at most 1 level of 255
    assert lat <= 1e-4 and px <= 1


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("scheduler, prediction", GRID)
def test_inpaint_9_channel_equals_diffusers(tiny9, scheduler, prediction, strength):
    lat, px, _ = _pair(tiny9, scheduler, mask=True, strength=strength, prediction=prediction)
    # Measured: max latent difference 4e-6..1.5e-4 (float rounding), at most 1 level of 255
    assert lat <= 5e-4 and px <= 1


def test_strength_picks_the_start_step(tiny):
    eng = optimize(tiny)
    calls = []
    real = eng.backend.unet
    eng.backend.unet = lambda x, t, e: calls.append(int(t)) or real(x, t, e)
    eng.generate("a cat", image=drawn(), strength=0.5, num_inference_steps=10, scheduler="ddim", seed=0,
                 progress=False)
    assert len(calls) == 5  # int(10 * 0.5) steps: the last five of the schedule
    assert calls[0] < 500


def test_seed_per_image_holds_in_a_batch(tiny):
    eng = optimize(tiny)
    kw = dict(num_inference_steps=STEPS, progress=False, scheduler="euler-ancestral", mask_image=corner_mask())
    batch = eng.generate(["a cat", "a dog"], image=drawn(), seed=10, **kw)
    alone = eng.generate("a dog", image=drawn(), seed=11, **kw)
    assert torch.allclose(batch.latents[1], alone.latents[0], atol=1e-4, rtol=1e-4)


def test_inpaint_keeps_the_unmasked_pixels_with_a_4_channel_unet(tiny):
    out = optimize(tiny).generate("a cat", image=drawn(), mask_image=corner_mask(), num_inference_steps=STEPS,
                                  seed=0, progress=False)
    # latents outside the mask are the original's (noised to t=0 after the last step): only the mask changes
    a = optimize(copy.deepcopy(tiny)).generate("a dog", image=drawn(), mask_image=corner_mask(),
                                               num_inference_steps=STEPS, seed=0, progress=False)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:4, :4] = False
    assert torch.allclose(out.latents[0][:, keep], a.latents[0][:, keep], atol=1e-5)
    assert not torch.allclose(out.latents[0][:, ~keep], a.latents[0][:, ~keep], atol=1e-2)


def test_tensor_images_are_taken(tiny):
    t = torch.rand(1, 3, 64, 64) * 2 - 1
    out = optimize(tiny).generate("a cat", image=t, num_inference_steps=2, seed=0, progress=False, strength=1.0)
    assert out.images[0].size == (64, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_image=corner_mask()), "mask_image: .* only together with an image"),
    (dict(image=drawn(), strength=0.0), "strength: got 0.0; allowed: a number in \\(0, 1\\]"),
    (dict(image=drawn(), strength=1.5), "strength"),
    (dict(image=drawn(), strength=0.05), "strength: .* with 4 steps"),
    (dict(image=drawn(), mask_image=corner_mask(32)), "mask_image: .*the image's size 64x64"),
    (dict(image=drawn(size=60)), "image: got '60x60'; allowed: .*multiples of 8.*--resize: rounded down to 56x56"),
    (dict(image=drawn(), height=128, width=128), "image: got '64x64'; allowed: an image of 128x128"),
    (dict(image=[drawn(), drawn(), drawn()]), "image: got '3 images'"),
    (dict(image="in.png"), "image: got 'str'"),
])
def test_bad_image_input_is_one_line(tiny, kwargs, match):
    eng = optimize(tiny)
    with pytest.raises(InvalidParameter, match=match):
        eng.generate(["a cat", "a dog"], num_inference_steps=STEPS, progress=False, **kwargs)


def test_resize_and_nine_channel_needs_a_mask(tiny, tiny9):
    out = optimize(tiny).generate("a cat", image=drawn(size=76), resize=True, num_inference_steps=2, seed=0,
                                  progress=False)
    assert out.images[0].size == (72, 72)
    out = optimize(tiny).generate("a cat", image=drawn(size=64), resize=True, height=96, width=128,
                                  num_inference_steps=2, seed=0, progress=False)
    assert out.images[0].size == (128, 96)
    eng = optimize(tiny9)
    with pytest.raises(InvalidParameter, match="mask_image: .*9-channel inpainting model"):
        eng.generate("a cat", image=drawn(), num_inference_steps=2, progress=False)
    with pytest.raises(InvalidParameter, match="image: .*9-channel inpainting model"):
        eng.generate("a cat", num_inference_steps=2, progress=False)
