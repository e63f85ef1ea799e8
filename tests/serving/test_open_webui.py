"""Open WebUI's "OpenAI" image engine against fastsd's /v1 routes: the requests its backend sends, as its
code builds them (open-webui/open-webui, backend/open_webui/routers/images.py: image_generations and
image_edits), sent here with httpx instead of its aiohttp session.

- Generation: POST {base URL}/images/generations, JSON {"model", "prompt", "n", "size", "response_format":
  "b64_json"} (no response_format for models matching ^gpt-image), merged with the admin's extra OpenAI
  params; "Authorization: Bearer KEY"; "?api-version=V" when an API version is set; X-OpenWebUI-User-*
  headers with ENABLE_FORWARD_USER_INFO_HEADERS. It reads data[i].b64_json (base64 without a data: prefix),
  else fetches data[i].url with the same Authorization header.
- Edit: POST {base URL}/images/edits, multipart: every value as text (model, prompt, n, size, background
  where set, response_format), the image as the file field "image" named UUID.png (several: "image[]").
- Without a model set it sends "dall-e-2".
"""
import base64
import io
import uuid

import pytest
from PIL import Image, ImageDraw

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a blue background"


def headers(dep, **extra):
    return {"Authorization": f"Bearer {dep['token']}", **extra}


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_open_webui_generation_request(shapes_api_deployment):
    dep = shapes_api_deployment
    body = {"model": "fastsd-shapes", "prompt": PROMPT, "n": 1, "size": "64x64", "response_format": "b64_json",
            "num_inference_steps": 4, "seed": 3}  # the last two: Open WebUI's extra OpenAI params, merged in
    user = {"X-OpenWebUI-User-Name": "ada", "X-OpenWebUI-User-Id": "u1", "X-OpenWebUI-User-Email": "a@b.c",
            "X-OpenWebUI-User-Role": "admin"}
    r = httpx.post(dep["url"] + "/v1/images/generations?api-version=2024-02-01", json=body,
                   headers=headers(dep, **user), timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1 and "url" not in data[0]
    image = png_of(data[0]["b64_json"])
    assert image.format == "PNG" and image.size == (64, 64)
    # a gpt-image model name gets no response_format from Open WebUI: fastsd answers b64_json then too; and the
    # model Open WebUI sends when none is set is a 404 that names fastsd's model
    r = httpx.post(dep["url"] + "/v1/images/generations", json={**body, "model": "dall-e-2"}, headers=headers(dep),
                   timeout=60)
    assert r.status_code == 404 and "fastsd-shapes" in r.json()["error"]["message"]


def test_open_webui_edit_request(shapes_api_deployment):
    dep = shapes_api_deployment
    im = Image.new("RGB", (64, 64), (30, 70, 225))
    ImageDraw.Draw(im).ellipse([16, 16, 48, 48], fill=(220, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    form = {"model": "fastsd-shapes", "prompt": "a yellow circle on a blue background", "n": "1", "size": "64x64",
            "background": "auto", "response_format": "b64_json", "num_inference_steps": "4", "seed": "3"}
    files = {"image": (f"{uuid.uuid4()}.png", buf.getvalue(), "image/png")}
    r = httpx.post(dep["url"] + "/v1/images/edits", data=form, files=files, headers=headers(dep), timeout=120)
    assert r.status_code == 200, r.text
    assert png_of(r.json()["data"][0]["b64_json"]).size == (64, 64)
    # several images ("image[]") are one too many for fastsd, and a transparent background is refused, by name
    two = [("image[]", (f"{uuid.uuid4()}.png", buf.getvalue(), "image/png"))] * 2
    r = httpx.post(dep["url"] + "/v1/images/edits", data=form, files=two, headers=headers(dep), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image[]"
    r = httpx.post(dep["url"] + "/v1/images/edits", data={**form, "background": "transparent"}, files=files,
                   headers=headers(dep), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "background", r.text
    assert "opaque" in r.json()["error"]["message"]
