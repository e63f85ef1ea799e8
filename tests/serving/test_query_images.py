"""`fastsd query --image/--mask/--strength`: the request the CLI builds and MII's client packs for the
InpaintingReply RPC, and the one-line errors before anything connects. (A real deployment answering it:
tests/serving/test_serving_tasks.py, marked slow.)"""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

import mii  # noqa: F401 - the serving extra: `make test` installs it, so a missing one fails, not skips
from fastsd.cli import main
from fastsd.serving import cli as serving_cli
from fastsd.serving.client import image_request


@pytest.fixture
def files(tmp_path):
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    im.save(tmp_path / "in.jpg", quality=95)
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    m.save(tmp_path / "mask.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    return tmp_path


@pytest.fixture
def sent(monkeypatch):
    """The deployment client `fastsd query` uses replaced by a recorder that answers with one grey image
    per prompt."""
    calls = []

    class Reply:
        def __init__(self, n):
            self.images = [Image.new("RGB", (64, 64), (128, 128, 128))] * n
            self.nsfw_content_detected = [False] * n

    class FakeClient:
        def __init__(self, name, timeout=None):
            self.name = name

        def generate(self, prompts, negatives=None, **kw):
            calls.append({"name": self.name, "prompts": prompts, **kw})
            return Reply(len(prompts))
    monkeypatch.setattr(serving_cli, "DeploymentClient", FakeClient)
    return calls


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_query_sends_image_mask_and_strength(files, sent, capsys):
    assert main(["query", "dep", "a yellow square", "--image", str(files / "in.jpg"), "--mask",
                 str(files / "mask.png"), "--strength", "0.6", "--steps", "6", "--seed", "3",
                 "--out", str(files / "out.png")]) == 0
    [call] = sent
    assert call["name"] == "dep" and call["prompts"] == ["a yellow square"]
    assert call["strength"] == 0.6 and call["num_inference_steps"] == 6 and call["seed"] == 3
    # PNG bytes of exactly the pixels the CLI read (the JPEG decoded once, here), the mask as one channel
    assert call["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decoded(call["image"]), np.asarray(Image.open(files / "in.jpg").convert("RGB")))
    assert np.array_equal(decoded(call["mask_image"]), np.asarray(Image.open(files / "mask.png")))
    assert (files / "out.png").exists()
    sent.clear()
    assert main(["query", "dep", "a blue circle", "--image", str(files / "in.jpg"), "--out",
                 str(files / "o2.png")]) == 0
    assert sent[0]["mask_image"] is None and sent[0]["strength"] is None  # image-to-image, the server's default


def test_text_query_sends_no_image(files, sent):
    assert main(["query", "dep", "a cat", "--out", str(files / "t.png")]) == 0
    assert "image" not in sent[0] or sent[0]["image"] is None


def test_image_request_is_what_mii_packs_for_inpainting():
    from mii.legacy.method_table import GRPC_METHOD_TABLE
    from mii.legacy.constants import TaskType
    req = image_request(["a", "b"], None, b"\x89PNG-image", b"\x89PNG-mask")
    assert req == {"prompt": ["a", "b"], "negative_prompt": ["", ""], "image": [b"\x89PNG-image"],
                   "mask_image": [b"\x89PNG-mask"]}
    proto = GRPC_METHOD_TABLE[TaskType.INPAINTING].pack_request_to_proto(req, strength=0.5)
    assert list(proto.image) == [b"\x89PNG-image"] and list(proto.mask_image) == [b"\x89PNG-mask"]
    assert proto.query_kwargs["strength"].fvalue == 0.5
    # image-to-image: the same RPC with an empty mask list (MII's client requires the key)
    proto = GRPC_METHOD_TABLE[TaskType.INPAINTING].pack_request_to_proto(image_request(["a"], ["ugly"], b"i", None))
    assert list(proto.mask_image) == [] and list(proto.negative_prompt) == ["ugly"]
    with pytest.raises(TypeError):
        image_request(["a"], None, Image.new("RGB", (8, 8)), None)  # PIL images: MII would fail on format None


@pytest.mark.parametrize("argv, name", [
    (["--image", "missing.png"], "image"),
    (["--image", "bad.png"], "image"),
    (["--mask", "mask.png"], "mask"),
    (["--strength", "0.5"], "strength"),
    (["--image", "in.jpg", "--strength", "1.5"], "strength"),
    (["--image", "in.jpg", "--mask", "small.png"], "mask"),
    (["--image", "in.jpg", "--height", "128"], "height"),  # the replica does not resize
    (["--image", "in.jpg", "--resize"], None),  # no --resize: the deployment takes the image at its size
])
def test_bad_image_options_are_one_line(files, sent, capsys, monkeypatch, argv, name):
    monkeypatch.chdir(files)
    with pytest.raises(SystemExit) if name is None else _nothing():
        code = main(["query", "dep", "a cat", *argv])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (name is None or err[0].startswith(f"fastsd query: error: {name}:")), err
    assert not sent  # refused before anything was sent


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
