"""The SD 2 family through the command line: an inpainting folder as published, depth-to-image with
--depth-map, the x4 upscaler, `verify --model DIR` on both kinds with no other input, the --upscale chain."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastsd.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    im.save(tmp_path / "in.png")
    im.resize((16, 16)).save(tmp_path / "low.png")
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    m.save(tmp_path / "mask.png")
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray((65535 * (1 - np.hypot(xx - 32, yy - 32) / 46)).clip(0, 65535).astype(np.uint16)).save(
        tmp_path / "depth16.png")
    return tmp_path


def test_inpainting_folder_as_published_runs(capsys, files, tiny_inpaint_folder):
    """The SD 2 inpainting checkpoint's layout: model_index.json names StableDiffusionInpaintPipeline."""
    code, out, err = run(capsys, "generate", "a cat", "--model", str(tiny_inpaint_folder), "--image",
                         str(files / "in.png"), "--mask", str(files / "mask.png"), "--steps", "2", "--out",
                         str(files / "i.png"), "-q")
    assert code == 0, err
    assert Image.open(files / "i.png").size == (64, 64)


def test_generate_depth_and_upscale(capsys, files, tiny_depth_folder, tiny_upscaler_folder):
    code, out, err = run(capsys, "generate", "a cat", "--model", str(tiny_depth_folder), "--image",
                         str(files / "in.png"), "--depth-map", str(files / "depth16.png"), "--strength", "0.9",
                         "--steps", "3", "--seed", "2", "--out", str(files / "d.png"))
    assert code == 0, err
    assert "seed=2" in out and Image.open(files / "d.png").size == (64, 64)
    code, out, err = run(capsys, "generate", "a cat", "--model", str(tiny_depth_folder), "--image",  # its DPT
                         str(files / "in.png"), "--steps", "2", "--out", str(files / "e.png"), "-q")
    assert code == 0, err
    code, out, err = run(capsys, "generate", "a cat", "--model", str(tiny_upscaler_folder), "--image",
                         str(files / "low.png"), "--noise-level", "40", "--steps", "3", "--out", str(files / "u.png"))
    assert code == 0, err
    assert Image.open(files / "u.png").size == (64, 64)  # 4x the 16x16 input


@pytest.mark.parametrize("folder", ["tiny_depth_folder", "tiny_upscaler_folder"])
def test_verify_model_dir_needs_no_other_input(capsys, files, folder, request):
    path, report = request.getfixturevalue(folder), files / "v.json"
    code, out, err = run(capsys, "verify", "--model", str(path), "--steps", "3", "--json", str(report), "-q")
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert data["passed"] and data["task"] == ("depth" if "depth" in folder else "upscale")
    assert all(r["psnr_db"] is None or r["psnr_db"] >= 45 for r in data["images"]) and len(data["images"]) == 2
    assert "PASS" in out and ("noise level 20, input 16x16" in out if "upscal" in folder else "depth map made" in out)


def test_upscale_chain_gives_4x_in_one_command(capsys, files):
    code, out, err = run(capsys, "generate", "a cat", "--model", "tiny", "--upscale", "--upscaler", "tiny-upscaler",
                         "--steps", "2", "--seed", "1", "--out", str(files / "big.png"))
    assert code == 0, err
    assert Image.open(files / "big.png").size == (256, 256) and Image.open(files / "big-base.png").size == (64, 64)
    assert "upscaled 4x with tiny-upscaler" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-upscaler", "--noise-level", "20"], "noise_level: got 20; allowed: only together with --image"),
    (["--model", "tiny-upscaler", "--image", "low.png", "--noise-level", "400"],
     "noise_level: got 400; allowed: an integer in [0, 350]"),
    (["--model", "tiny-upscaler", "--image", "in.png", "--height", "128"], "height: got 128; allowed: nothing with "
                                                                          "the x4 upscaler"),
    (["--model", "tiny", "--image", "in.png", "--depth-map", "depth16.png"], "depth_map: got 'a ndarray'; allowed: "
                                                                            "nothing with this model (sd)"),
    (["--model", "tiny-depth", "--image", "in.png", "--depth-map", "in.png"], "depth_map: got 'a RGB PNG'"),
    (["--model", "tiny", "--upscale", "--upscaler", "tiny"], "upscaler: got 'tiny'; allowed: an x4 upscaler"),
])
def test_bad_kind_options_are_one_line(capsys, files, monkeypatch, argv, message):
    monkeypatch.chdir(files)
    code, _, err = run(capsys, "generate", "a cat", *argv, "--steps", "2", "--out", str(files / "x.png"), "-q")
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_models_shows_the_depth_and_upscaler_presets(capsys):
    code, out, _ = run(capsys, "models", "sd-2-depth", "sd-x4-upscaler")
    assert code == 0
    depth = next(line for line in out.splitlines() if line.startswith("sd-2-depth"))
    up = next(line for line in out.splitlines() if line.startswith("sd-x4-upscaler"))
    assert "865.91M" in depth and "122.38M" in depth and "stabilityai/stable-diffusion-2-depth" in depth
    assert "473.40M" in up and "55.33M" in up and "v_prediction" in up
