"""`fastsd generate --image/--mask/--strength` and `fastsd verify --task`: outputs and one-line errors."""
import json

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
    im.save(tmp_path / "in.webp")
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    m.save(tmp_path / "mask.png")
    Image.new("RGB", (76, 68)).save(tmp_path / "odd.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    return tmp_path


def test_generate_img2img_and_inpaint(capsys, files):
    code, out, err = run(capsys, "generate", "a cat", "--model", "tiny", "--image", str(files / "in.webp"),
                         "--strength", "0.5", "--steps", "4", "--seed", "1", "--out", str(files / "a.png"))
    assert code == 0 and "seed=1" in out and "vae encode" in err
    code, out, _ = run(capsys, "generate", "a cat", "--model", "tiny-inpainting", "--image", str(files / "in.png"),
                       "--mask", str(files / "mask.png"), "--steps", "2", "--out", str(files / "b.png"), "-q")
    assert code == 0 and Image.open(files / "b.png").size == (64, 64)
    code, _, _ = run(capsys, "generate", "a cat", "--model", "tiny", "--image", str(files / "odd.png"), "--resize",
                     "--steps", "2", "--out", str(files / "c.png"), "-q")
    assert code == 0 and Image.open(files / "c.png").size == (72, 64)


@pytest.mark.parametrize("argv, message", [
    (["--image", "missing.png"], "image: got 'missing.png'; allowed: a readable image file"),
    (["--image", "bad.png"], "image: got 'data that is not an image'"),
    (["--image", "in.png", "--mask", "small.png"], "mask: got '32x32'; allowed: the image's size 64x64"),
    (["--image", "odd.png"], "image: got '76x68'; allowed: a width and height that are multiples of 8"),
    (["--image", "in.png", "--strength", "0"], "strength: got 0.0; allowed: a number in (0, 1]"),
    (["--image", "in.png", "--strength", "1.5"], "strength: got 1.5"),
    (["--mask", "mask.png"], "mask: got 'mask.png'; allowed: a mask only together with --image"),
    (["--strength", "0.5"], "strength: got 0.5; allowed: only together with --image"),
    (["--model", "tiny-inpainting", "--image", "in.png"], "mask_image: got None; allowed: a mask"),
    (["--model", "tiny-inpainting"], "image: got None; allowed: an image and a mask"),
    (["--image", "in.png", "--height", "128"], "image: got '64x64'; allowed: an image of 64x128"),
])
def test_bad_image_options_are_one_line(capsys, files, monkeypatch, argv, message):
    monkeypatch.chdir(files)
    argv = ["--model", "tiny", *argv] if "--model" not in argv else argv
    code, _, err = run(capsys, "generate", "a cat", *argv, "--steps", "2", "--out", str(files / "x.png"), "-q")
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("model, task", [("tiny", "img2img"), ("tiny", "inpaint"), ("tiny-inpainting", "inpaint")])
def test_verify_task(capsys, files, model, task):
    report = files / "v.json"
    code, out, _ = run(capsys, "verify", "--model", model, "--task", task, "--steps", "3", "--json", str(report),
                       "-q", "--scheduler", "ddim")
    assert code == 0, out
    data = json.loads(report.read_text())
    assert data["passed"] and data["task"] == task and len(data["images"]) == 2
    assert data["strength"] == (0.8 if task == "img2img" else 1.0)
