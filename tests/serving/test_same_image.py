"""The same model, seed, size, steps, guidance and scheduler give the same image, pixel for pixel, through
every door: `fastsd generate`, `POST /score`, the OpenAI Images API and the A1111 API; likewise
image-to-image and inpainting through `fastsd generate --image [--mask]`, `/v1/images/edits` and
`/sdapi/v1/img2img`. One live deployment (shapes_api_deployment), real clients."""
import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastsd.cli import main

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(600)
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE = "a red circle on a green square", "blue", 1234, 5, 6.5


def same(*images) -> bool:
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    return all(a.shape == arrays[0].shape and (a == arrays[0]).all() for a in arrays[1:])


def b64image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


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


def clients(dep):
    oa = openai.OpenAI(base_url=dep["url"] + "/v1", api_key=dep["token"], max_retries=0, timeout=120)
    a1 = webuiapi.WebUIApi(host="127.0.0.1", port=dep["rest_port"])
    a1.session.headers["Authorization"] = "Bearer " + dep["token"]
    return oa, a1


def cli(tmp_path, *argv) -> Image.Image:
    out = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--model", "fastsd-shapes", "--quiet", "--steps", str(STEPS), "--seed",
                 str(SEED), "--guidance", str(GUIDANCE), "--negative", NEGATIVE, "--scheduler", "euler",
                 "--out", str(out), *argv]) == 0
    return Image.open(out)


def test_text_to_image_through_every_door(shapes_api_deployment, tmp_path):
    dep = shapes_api_deployment
    oa, a1 = clients(dep)
    doc = {"input_data": {"columns": ["prompt", "negative_prompt"], "data": [[PROMPT, NEGATIVE]],
                          "parameters": {"seed": SEED, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
                                         "scheduler": "euler", "width": 64, "height": 64}}}
    r = httpx.post(dep["url"] + "/score", json=doc, headers={"Authorization": "Bearer " + dep["token"]}, timeout=120)
    score = b64image(r.json()[0]["generated_image"])
    gen = oa.images.generate(prompt=PROMPT, size="64x64", extra_body={
        "seed": SEED, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE,
        "scheduler": "euler"})
    a1111 = a1.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=GUIDANCE,
                       sampler_name="Euler", width=64, height=64)
    assert same(cli(tmp_path), score, b64image(gen.data[0].b64_json), a1111.image)


def test_image_to_image_and_inpainting_through_every_door(shapes_api_deployment, tmp_path):
    dep = shapes_api_deployment
    oa, a1 = clients(dep)
    drawn().save(tmp_path / "in.png")
    corner().save(tmp_path / "mask.png")
    extra = {"seed": SEED, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE,
             "scheduler": "euler"}
    a1kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=GUIDANCE,
                sampler_name="Euler", width=64, height=64, images=[drawn()])
    # image-to-image
    want = cli(tmp_path, "--image", str(tmp_path / "in.png"), "--strength", "0.7")
    edit = oa.images.edit(image=("in.png", png(drawn()), "image/png"), prompt=PROMPT,
                          extra_body={**extra, "strength": 0.7})
    assert same(want, b64image(edit.data[0].b64_json), a1.img2img(denoising_strength=0.7, **a1kw).image)
    # inpainting
    want = cli(tmp_path, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.9")
    edit = oa.images.edit(image=("in.png", png(drawn()), "image/png"), mask=("m.png", png(corner()), "image/png"),
                          prompt=PROMPT, extra_body={**extra, "strength": 0.9})
    a1111 = a1.img2img(mask_image=corner(), denoising_strength=0.9, mask_blur=0, inpainting_fill=1,
                       inpaint_full_res=False, **a1kw)
    assert same(want, b64image(edit.data[0].b64_json), a1111.image)
