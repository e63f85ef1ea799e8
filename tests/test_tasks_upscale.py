"""The x4 upscaler (fastsd.tasks_upscale, fastsd.upscale_tiles) against diffusers' FP32
StableDiffusionUpscalePipeline on the same modules, images and seeds; the tiling; and the input checks."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import optimize
from fastsd.errors import InvalidParameter
from fastsd.loading import build_random
from fastsd.presets import PRESETS
from fastsd.reference import psnr, to_uint8
from fastsd.upscale_tiles import run_tiled, starts, tiling
from fastsd.verify_kinds import run_reference, sample_image


@pytest.fixture(scope="module")
def _up():
    return build_random(PRESETS["tiny-upscaler"], seed=0)


@pytest.fixture
def model(_up):
    return copy.deepcopy(_up)


@pytest.mark.parametrize("noise_level, scheduler", [(20, None), (150, "euler-ancestral")])
def test_upscale_equals_diffusers(model, noise_level, scheduler):
    prompts, low, seeds = ["a red circle", "a blue square"], sample_image((16, 24)), [5, 6]
    ref, ref_latents, _ = run_reference(copy.deepcopy(model), prompts, ["", ""], steps=4, guidance=7.5, seeds=seeds,
                                        scheduler=scheduler, image=low, noise_level=noise_level)
    out = optimize(model).generate(prompts, num_inference_steps=4, seed=seeds, progress=False, image=low,
                                   noise_level=noise_level, scheduler=scheduler)
    assert out.images[0].size == (64, 96)  # 4x the input, no --height/--width
    a, b = to_uint8(ref), to_uint8(out.images)
    assert psnr(a, b) >= 45 and np.abs(a.astype(int) - b).max() <= 2
    assert (out.latents - ref_latents).abs().max().item() < 1e-4


def test_noise_level_changes_the_image_and_is_checked(model):
    eng = optimize(model)
    kw = dict(num_inference_steps=2, seed=0, progress=False, image=sample_image((16, 16)))
    quiet, loud = (eng.generate("a", noise_level=n, **kw).latents for n in (0, 300))
    assert not torch.equal(quiet, loud)
    for bad in (351, -1, 2.5):
        with pytest.raises(InvalidParameter, match=r"noise_level: got .*; allowed: an integer in \[0, 350\]"):
            eng.generate("a", noise_level=bad, **kw)
    with pytest.raises(InvalidParameter, match="height: got 128; allowed: nothing with the x4 upscaler: the output "
                                               "is 4x the input's size"):
        eng.generate("a", height=128, **kw)
    with pytest.raises(InvalidParameter, match="image: got '18x16'; allowed: a width and height that are multiples "
                                               "of 4"):
        eng.generate("a", **{**kw, "image": Image.new("RGB", (18, 16))})
    with pytest.raises(InvalidParameter, match="image: got '600x64'; allowed: an input whose 4x output is within"):
        eng.generate("a", **{**kw, "image": Image.new("RGB", (600, 64))})
    with pytest.raises(InvalidParameter, match="image: got None; allowed: a low-resolution image"):
        eng.generate("a", num_inference_steps=2, progress=False)
    with pytest.raises(InvalidParameter, match="strength: got 0.5; allowed: nothing with the x4 upscaler"):
        eng.generate("a", strength=0.5, **kw)


def test_tiles_cover_the_latents_and_blend_without_seams():
    t = tiling(16, 2)
    assert t.overlap == 4 and starts(16, t) == [0] and starts(40, t) == [0, 12, 24]
    for n in (18, 40, 62, 128):
        s = starts(n, t)
        assert s[0] == 0 and s[-1] == n - 16 and all(b - a <= 16 - t.overlap for a, b in zip(s, s[1:]))
    # an operator that sees each latent on its own is the same tiled and whole: the blend is a partition of 1
    x = torch.randn(2, 7, 40, 56)
    local = lambda v: v[:, :4] * 2 + v[:, 4:5]  # noqa: E731
    assert torch.allclose(run_tiled(local, x, t), local(x), atol=1e-6)
    calls = []
    run_tiled(lambda v: calls.append(v.shape[-2:]) or v[:, :4], x, t)
    assert len(calls) == 3 * 5 and all(c == (16, 16) for c in calls)
    with pytest.raises(InvalidParameter, match="tile_size: got 15; allowed: an integer >= 16, a multiple of 2"):
        tiling(15, 2)


def test_tiled_generation_stays_close_to_whole(model):
    """Tiles change what the UNet sees (its attention is global), so tiled is not bit-identical; on the tiny model
    the blended result stays near the one-call result and has no seam stronger than the image's own edges."""
    low = sample_image((32, 32))
    kw = dict(num_inference_steps=3, seed=0, progress=False, image=low)
    whole = optimize(copy.deepcopy(model)).generate("a cat", **kw)
    tiled = optimize(model).generate("a cat", tile_size=16, **kw)
    assert tiled.images[0].size == whole.images[0].size == (128, 128)
    a, b = to_uint8(whole.images)[0].astype(float), to_uint8(tiled.images)[0].astype(float)
    assert psnr(a, b) > 20
    # no seam: the column-to-column jumps around the tile borders are no larger than elsewhere
    jumps = np.abs(np.diff(b, axis=1)).mean(axis=(0, 2))
    assert jumps.max() <= 3 * np.median(jumps) + 10


def test_a_diffusers_pipeline_is_taken_as_it_is(model):
    """optimize(pipe) on a user's StableDiffusionUpscalePipeline keeps its low_res_scheduler and noise limit."""
    pipe = copy.deepcopy(model).to_pipeline()
    out = optimize(pipe).generate("a", image=sample_image((16, 16)), num_inference_steps=2, seed=0, progress=False)
    ref = optimize(model).generate("a", image=sample_image((16, 16)), num_inference_steps=2, seed=0, progress=False)
    assert torch.equal(out.latents, ref.latents)
