"""Depth-to-image (fastsd.tasks_depth, fastsd.depth) against diffusers' FP32 StableDiffusionDepth2ImgPipeline
on the same modules, images, depth maps and seeds; depth map files; and the input checks."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastsd import optimize
from fastsd.depth import read_depth_map, to_latent_size
from fastsd.errors import InvalidParameter
from fastsd.loading import build_random
from fastsd.presets import PRESETS
from fastsd.reference import psnr, to_uint8
from fastsd.verify_kinds import run_reference, sample_depth_map


@pytest.fixture(scope="module")
def _depth():
    return build_random(PRESETS["tiny-depth"], seed=0)


@pytest.fixture
def model(_depth):
    return copy.deepcopy(_depth)


def drawn(colour=(200, 30, 30), size=64):
    im = Image.new("RGB", (size, size), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return im


@pytest.mark.parametrize("given", [True, False], ids=["depth_map", "dpt_estimator"])
def test_depth2img_equals_diffusers(model, given):
    prompts, image, seeds = ["a red circle", "a blue square"], drawn(), [3, 4]
    dmap = sample_depth_map((64, 64)) if given else None
    ref, ref_latents, _ = run_reference(copy.deepcopy(model), prompts, ["", ""], steps=4, guidance=7.5, seeds=seeds,
                                        scheduler=None, image=image, depth_map=dmap, strength=0.7)
    out = optimize(model).generate(prompts, num_inference_steps=4, seed=seeds, progress=False, image=image,
                                   depth_map=dmap, strength=0.7)
    a, b = to_uint8(ref), to_uint8(out.images)
    assert psnr(a, b) >= 45 and np.abs(a.astype(int) - b).max() <= 2
    assert (out.latents - ref_latents).abs().max().item() < 1e-4
    assert out.timings["depth_map"] >= 0 and "vae_encode" in out.timings


def test_the_depth_map_steers_the_image(model):
    kw = dict(num_inference_steps=3, seed=0, progress=False, image=drawn(), strength=1.0)
    a = optimize(copy.deepcopy(model)).generate("a cat", depth_map=sample_depth_map((64, 64)), **kw).latents
    b = optimize(model).generate("a cat", depth_map=1 - sample_depth_map((64, 64)), **kw).latents
    assert (a - b).abs().max() > 1e-3


def test_depth_map_files_read_as_arrays(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.float64).reshape(48, 64) / (64 * 48 - 1))
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "d8.png")
    np.save(tmp_path / "d.npy", ramp.astype(np.float32))
    d16, d8, dn = (read_depth_map(tmp_path / n) for n in ("d16.png", "d8.png", "d.npy"))
    assert d16.shape == d8.shape == dn.shape == (48, 64) and d16.max() > 60000 and d8.max() == 255
    # the scale does not matter: each map is brought to [-1, 1] by its own min and max, as diffusers does
    maps = [to_latent_size([torch.from_numpy(d)], 6, 8) for d in (d16, d8, dn)]
    assert maps[0].min() == -1 and maps[0].max() == 1 and (maps[0] - maps[2]).abs().max() < 1e-4
    assert (maps[1] - maps[2]).abs().max() < 0.02  # 8 bits of the same ramp


@pytest.mark.parametrize("name, content, match", [
    ("rgb.png", "rgb", "depth_map: got 'a RGB PNG'; allowed: a grayscale PNG"),
    ("d.jpg", "rgb", "a grayscale PNG (8- or 16-bit) or a .npy HxW float array"),
    ("cube.npy", "cube", "depth_map: got 'a float32 array of shape (2, 2, 2)'; allowed: an HxW array"),
    ("missing.png", None, "an existing depth map file"),
])
def test_bad_depth_map_files_name_the_parameter(tmp_path, name, content, match):
    if content == "rgb":
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    elif content == "cube":
        np.save(tmp_path / name, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(InvalidParameter, match=match.replace("(", r"\(").replace(")", r"\)")):
        read_depth_map(tmp_path / name)


def test_depth_input_checks(model):
    eng = optimize(model)
    with pytest.raises(InvalidParameter, match="image: got None; allowed: an image: this is a depth-to-image model"):
        eng.generate("a cat", num_inference_steps=2, progress=False)
    with pytest.raises(InvalidParameter, match="depth_map: got 'a constant map'"):
        eng.generate("a cat", image=drawn(), depth_map=np.ones((8, 8), np.float32), num_inference_steps=2,
                     progress=False)
    with pytest.raises(InvalidParameter, match="noise_level: got 20; allowed: nothing with a depth-to-image model"):
        eng.generate("a cat", image=drawn(), noise_level=20, num_inference_steps=2, progress=False)
    eng.model.extra.pop("depth_estimator")  # a single-file model has none: a map must be given
    with pytest.raises(InvalidParameter, match="depth_map: got None; allowed: a depth map .* has no depth estimator"):
        eng.generate("a cat", image=drawn(), num_inference_steps=2, progress=False)


def test_depth_map_only_for_a_depth_model(tiny):
    with pytest.raises(InvalidParameter, match="depth_map: got .a ndarray.; allowed: nothing with this model .sd."):
        optimize(tiny).generate("a cat", depth_map=np.zeros((8, 8)), num_inference_steps=2, progress=False)


def test_python_verify_takes_a_depth_model(model):
    from fastsd.optimize import OptimizeConfig
    from fastsd.verify import verify
    report, *_ = verify(model, OptimizeConfig(device="cpu"), steps=2, prompts=["a red disc"])
    assert report["passed"] and report["task"] == "depth" and report["depth_map"] == "made"
