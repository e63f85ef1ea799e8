"""Image requests in the serving layer, in process: request parsing and limits, batching of image requests
of the same task/size/steps/strength, MII's InpaintingReply through fastsd's servicer with MII's own
client, and the REST body's Azure ML image formats."""
import asyncio
import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin

pytest.importorskip("mii")

from fastsd import images as imgs  # noqa: E402
from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.serving import ports  # noqa: E402
from fastsd.serving.batcher import BatchingPipeline  # noqa: E402
from fastsd.serving.request import Limits, parse  # noqa: E402
from fastsd.serving.rest import BadRequest, read_score_body  # noqa: E402


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def drawn(colour=(200, 30, 30)):
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=colour)
    return im


def corner():
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    return m


@pytest.fixture(scope="module")
def engine():
    from fastsd import load_model, optimize
    return optimize(load_model("tiny"), dtype="fp32")


def diff(a, b):
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# -- decoding under limits --------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    bomb = png(Image.new("L", (4000, 4000)))
    assert len(bomb) < 100_000

    def no_decode(self):
        raise AssertionError("decoded in full")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    with pytest.raises(InvalidParameter, match="image: got '4000x4000 pixels'; allowed: at most 1048576 pixels"):
        imgs.decode(bomb, max_pixels=1 << 20)


@pytest.mark.parametrize("data, match", [
    (b"", "encoded image bytes"), (b"GIF89a....", "not an image"), (png(drawn())[:60], "unreadable"),
    (png(drawn()), "at most 100 bytes"),
])
def test_bad_bytes_name_the_field(data, match):
    with pytest.raises(InvalidParameter, match=match):
        imgs.decode(data, "mask_image", max_bytes=100 if match.startswith("at most") else 1 << 20)


def test_formats():
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        drawn().save(buf, format=fmt)
        assert imgs.decode(buf.getvalue()).size == (64, 64)
    buf = io.BytesIO()
    drawn().save(buf, format="BMP")
    with pytest.raises(InvalidParameter, match="not an image"):
        imgs.decode(buf.getvalue())


# -- parsing ----------------------------------------------------------------------------------------
def test_parse_image_requests():
    r = parse(["a", "b"], None, {"num_images_per_prompt": 2, "strength": 0.5}, Limits(), 64, image=[drawn()])
    assert r.task == "img2img" and len(r.images) == 4 and r.masks is None and r.strength == 0.5
    r2 = parse(["a"], None, {}, Limits(), 64, image=[drawn()], mask_image=[corner()])
    assert r2.task == "inpaint" and r2.strength == 1.0 and r.key != r2.key
    assert parse(["a"], None, {}, Limits(), 64, image=[drawn()], mask_image=[]).task == "img2img"
    for kwargs, extra, match in [
        ({}, {"image": [drawn()] * 3}, "image: got '3 images'"),
        ({"height": 128}, {"image": [drawn()]}, "image: got '64x64'"),
        ({}, {"image": [drawn()], "mask_image": [Image.new("L", (8, 8))]}, "mask_image"),
        ({"strength": 2.0}, {"image": [drawn()]}, "strength"),
        ({"num_inference_steps": 4, "strength": 0.1}, {"image": [drawn()]}, "strength: got 0.1; allowed: at least"),
        ({}, {"mask_image": [corner()]}, "mask_image: .* only together with an image"),
    ]:
        with pytest.raises(InvalidParameter, match=match):
            parse(["a", "b"], None, kwargs, Limits(), 64, **extra)
    with pytest.raises(InvalidParameter, match="9-channel"):
        parse(["a"], None, {}, Limits(), 64, unet_in_channels=9)


def test_image_requests_of_one_task_are_batched(engine):
    pipe = BatchingPipeline(engine, max_batch=8, window=0.5)
    try:
        out = {}

        def call(k, **kw):
            out[k] = pipe(prompt=["x"], negative_prompt=[""], num_inference_steps=3, seed=5, **kw)
        ts = [threading.Thread(target=call, args=("a",), kwargs={"image": [drawn()], "mask_image": [corner()]}),
              threading.Thread(target=call, args=("b",), kwargs={"image": [drawn((0, 200, 0))],
                                                                 "mask_image": [corner()]}),
              threading.Thread(target=call, args=("c",), kwargs={"image": [drawn()]})]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        assert pipe.stats.batches == 2 and pipe.stats.merged_batches == 1  # the two inpaint requests merged
        alone = engine.generate("x", image=drawn((0, 200, 0)), mask_image=corner(), num_inference_steps=3, seed=5,
                                progress=False).images[0]
        assert diff(out["b"].images[0], alone) <= 1
    finally:
        pipe.close()


# -- MII's InpaintingReply, in process --------------------------------------------------------------
def test_inpainting_reply_with_mii_client(engine):
    import grpc
    from mii.legacy.client import MIIClient

    from fastsd.serving.replica import make_server, make_servicer
    port = ports.free_port_block(1)
    pipe = BatchingPipeline(engine, Limits(timeout=60, max_pixels=16384), max_batch=4, window=0.0)
    server = make_server(make_servicer(pipe), "127.0.0.1", port, workers=4)
    server.start()
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        client = MIIClient("text-to-image-inpainting", "127.0.0.1", port)
        reply = client.query({"prompt": ["a"], "image": [png(drawn())], "mask_image": [png(corner())]},
                             num_inference_steps=3, seed=2)
        want = engine.generate("a", image=drawn(), mask_image=corner(), num_inference_steps=3, seed=2,
                               progress=False).images[0]
        assert reply.images[0].size == (64, 64) and diff(reply.images[0], want) <= 1
        reply = client.query({"prompt": ["a"], "image": [png(drawn())], "mask_image": []}, num_inference_steps=3,
                             seed=2, strength=0.6)
        assert len(reply.images) == 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            client.query({"prompt": ["a"], "image": [png(Image.new("RGB", (200, 200)))], "mask_image": []})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("image: got '200x200 pixels'; allowed: at most 16384 pixels")
        assert len(client.query({"prompt": ["a"], "image": [png(drawn())], "mask_image": []},
                                num_inference_steps=2).images) == 1
    finally:
        server.stop(0)
        pipe.close()


# -- REST bodies -----------------------------------------------------------------------------------
def test_rest_image_formats():
    b64 = base64.b64encode(png(drawn())).decode()
    doc = {"input_data": {"columns": ["prompt", "image", "mask_image", "negative_prompt"],
                          "data": [{"prompt": "a", "image": b64, "mask_image": b64, "negative_prompt": "b"}],
                          "index": [0], "parameters": {"num_inference_steps": 5, "strength": 0.9}}}
    q = read_score_body(json.dumps(doc).encode(), with_images=True)
    assert q.prompts == ["a"] and q.negatives == ["b"] and q.parameters == {"num_inference_steps": 5, "strength": 0.9}
    assert q.image == [png(drawn())] and len(q.mask_image) == 1
    doc = {"input_data": {"columns": ["prompt", "image"], "data": [["a", "data:image/png;base64," + b64]]}}
    assert read_score_body(json.dumps(doc).encode(), with_images=True).mask_image == []
    for cell, match in [("https://example.com/a.png", "got 'a URL'.*does not fetch URLs"),
                        ("file:///etc/passwd", "got 'a URL'"), ("not base64!", "not base64"), (3, "image: got 3")]:
        doc = {"input_data": {"columns": ["prompt", "image"], "data": [["a", cell]]}}
        with pytest.raises(BadRequest, match=match) as e:
            read_score_body(json.dumps(doc).encode(), with_images=True)
        assert e.value.status == 422 and e.value.param == "image"
    with pytest.raises(BadRequest, match="mask_image: .*a mask only together with an image column"):
        read_score_body(b'{"input_data": {"columns": ["prompt", "mask_image"], "data": [["a", "x"]]}}',
                        with_images=True)
    with pytest.raises(BadRequest, match="unknown column 'image'"):  # the text-only parser refuses images
        read_score_body(b'{"input_data": {"columns": ["prompt", "image"], "data": [["a", "x"]]}}')
