"""The OpenAI Images API (`/v1`) of a live deployment, driven by the real `openai` client: generations
(b64_json and url), edits (image-to-image, inpainting with OpenAI's transparent mask or a black/white one),
models, the token, and every bad request answered in OpenAI's error shape (so the client raises its own
classes). Images are compared pixel for pixel with the engine the deployment runs."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(600)
STEPS = 4


def client(dep, token="from-deployment"):
    return openai.OpenAI(base_url=dep["url"] + "/v1", api_key=dep["token"] if token == "from-deployment" else token,
                         max_retries=0, timeout=120)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def drawn():
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    return im


def corner():
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    return m


def test_models_and_the_token(shapes_api_deployment):
    dep = shapes_api_deployment
    models = client(dep).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("fastsd-shapes", "model", "fastsd")]
    assert client(dep).models.retrieve("fastsd-shapes").id == "fastsd-shapes"
    with pytest.raises(openai.NotFoundError) as e:
        client(dep).models.retrieve("dall-e-3")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as e:
        client(dep, "wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key" and e.value.response.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/v1/models/fastsd-shapes", "/v1/anything"):  # no Authorization header at all
        r = httpx.get(dep["url"] + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    with pytest.raises(openai.AuthenticationError):
        client(dep, "wrong").images.generate(prompt="a red circle", size="64x64")


def test_generations_are_the_engines_images(shapes_api_deployment, shapes_engine):
    dep = shapes_api_deployment
    r = client(dep).images.generate(model="fastsd-shapes", prompt="a red circle", size="64x64", n=2,
                                    extra_body={"seed": 11, "num_inference_steps": STEPS, "guidance_scale": 7.5,
                                                "negative_prompt": "blue", "scheduler": "euler"})
    want = shapes_engine.generate("a red circle", "blue", num_images_per_prompt=2, num_inference_steps=STEPS,
                                  seed=11, scheduler="euler", height=64, width=64, progress=False).images
    assert len(r.data) == 2 and [d.model_extra["seed"] for d in r.data] == [11, 12]
    assert r.created > 0 and r.data[0].url is None and r.data[0].revised_prompt is None
    assert [max_diff(decoded(d.b64_json), w) for d, w in zip(r.data, want)] == [0, 0]
    # url: absolute, on the host and port the request came to, and the same PNG
    u = client(dep).images.generate(prompt="a red circle", size="64x64", response_format="url",
                                    extra_body={"seed": 11, "num_inference_steps": STEPS, "negative_prompt": "blue",
                                                "scheduler": "euler"})
    assert u.data[0].url.startswith(dep["url"] + "/files/images/") and u.data[0].b64_json is None
    got = httpx.get(u.data[0].url)  # no token: the URL is the permission
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    single = shapes_engine.generate("a red circle", "blue", num_inference_steps=STEPS, seed=11, scheduler="euler",
                                    progress=False).images[0]  # one image alone (a batch of 2 may differ by 1 level)
    assert max_diff(Image.open(io.BytesIO(got.content)), single) == 0
    assert httpx.get(dep["url"] + "/files/images/nosuchimage.png").status_code == 404
    # no seed: one is drawn and reported, and it reproduces the image
    r = client(dep).images.generate(prompt="a green square", size="64x64", extra_body={"num_inference_steps": STEPS})
    seed = r.data[0].model_extra["seed"]
    again = client(dep).images.generate(prompt="a green square", size="64x64",
                                        extra_body={"num_inference_steps": STEPS, "seed": seed})
    assert max_diff(decoded(r.data[0].b64_json), decoded(again.data[0].b64_json)) == 0


BAD = [  # (keyword arguments of images.generate, the param the error names)
    ({"size": "65x64"}, "size"), ({"size": "big"}, "size"), ({"size": "4096x4096"}, "size"), ({"n": 0}, "n"),
    ({"n": 99}, "n"), ({"response_format": "jpeg"}, "response_format"),
    ({"extra_body": {"num_inference_steps": 100000}}, "num_inference_steps"),
    ({"extra_body": {"guidance_scale": "high"}}, "guidance_scale"), ({"extra_body": {"seed": -5}}, "seed"),
    ({"extra_body": {"scheduler": "karras"}}, "scheduler"), ({"extra_body": {"lora": "nope:0.5"}}, "lora"),
    ({"extra_body": {"strength": 0.5}}, "strength"), ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"prompt": ""}, "prompt"), ({"prompt": 7}, "prompt"), ({"quality": 3}, "quality"),
]


def test_bad_requests_are_openai_errors(shapes_api_deployment):
    dep = shapes_api_deployment
    c = client(dep)
    for kw, param in BAD:
        with pytest.raises(openai.BadRequestError) as e:
            c.images.generate(**{"prompt": "x", "size": "64x64", **kw})
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
        assert err["param"] == param, (kw, err)
    with pytest.raises(openai.NotFoundError) as e:
        c.images.generate(model="dall-e-3", prompt="x")
    assert e.value.body["param"] == "model" and "fastsd-shapes" in e.value.body["message"]
    h = {"Authorization": "Bearer " + dep["token"], "Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", json.dumps({"size": "64x64"}).encode()):
        r = httpx.post(dep["url"] + "/v1/images/generations", content=raw, headers=h)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(dep["url"] + "/v1/images/generations", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(dep["url"] + "/v1/chat/completions", json={}, headers=h)
    assert r.status_code == 404 and "/v1/images/generations" in r.json()["error"]["message"]


def test_edits_image_to_image_and_inpainting(shapes_api_deployment, shapes_engine):
    dep = shapes_api_deployment
    c = client(dep)
    kw = {"num_inference_steps": STEPS, "seed": 5}
    r = c.images.edit(image=("in.png", png(drawn()), "image/png"), prompt="a blue circle",
                      extra_body={**kw, "strength": 0.6})
    want = shapes_engine.generate("a blue circle", image=drawn(), strength=0.6, num_inference_steps=STEPS, seed=5,
                                  progress=False).images[0]
    assert max_diff(decoded(r.data[0].b64_json), want) == 0
    # OpenAI's mask: transparent = repaint; the same inpainting as fastsd's white = repaint mask
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent.putalpha(corner().point(lambda v: 0 if v else 255))
    want = shapes_engine.generate("a yellow square", image=drawn(), mask_image=corner(), num_inference_steps=STEPS,
                                  seed=5, progress=False).images[0]
    for mask in (transparent, corner()):
        r = c.images.edit(image=("in.png", png(drawn()), "image/png"), mask=("mask.png", png(mask), "image/png"),
                          prompt="a yellow square", extra_body=kw)
        assert max_diff(decoded(r.data[0].b64_json), want) == 0, mask.mode
    for files, param in [({"image": ("in.png", b"not an image", "image/png")}, "image"),
                         ({"image": ("in.png", png(drawn()), "image/png"),
                           "mask": ("m.png", png(Image.new("L", (32, 32))), "image/png")}, "mask"),
                         ({"image": ("in.png", png(drawn()), "image/png"),
                           "mask": ("m.png", b"junk", "image/png")}, "mask")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.images.edit(prompt="x", extra_body=kw, **files)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.images.edit(image=("in.png", png(drawn()), "image/png"), prompt="x", extra_body={"seed": "abc"})
    assert e.value.body["param"] == "seed"
