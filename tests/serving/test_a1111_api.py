"""The AUTOMATIC1111 API (`/sdapi/v1`) of a live deployment, driven by the real `webuiapi` client:
txt2img and img2img (inpainting included) against the engine the deployment runs, seeds (-1 drawn and
reported, batch_size x n_iter taking seed, seed+1, ...), samplers by A1111's names, <lora:NAME:WEIGHT>
in the prompt, the listings, options, progress and interrupt, the token (bearer or basic auth), and bad
bodies answered 4xx in FastAPI's {"detail": ...} shape."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(600)
STEPS = 4


@pytest.fixture(scope="module")
def api(shapes_api_deployment):
    dep = shapes_api_deployment
    a = webuiapi.WebUIApi(host="127.0.0.1", port=dep["rest_port"], sampler="Euler", steps=STEPS)
    a.session.headers["Authorization"] = "Bearer " + dep["token"]
    return a


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def drawn():
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    return im


def corner():
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 31), fill=255)
    return m


def test_txt2img_is_the_engines_image(api, shapes_engine):
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=21, cfg_scale=7.5, width=64, height=64,
                    sampler_name="Euler a", steps=STEPS)
    want = shapes_engine.generate("a red circle", "blue", num_inference_steps=STEPS, seed=21, guidance_scale=7.5,
                                  scheduler="euler-ancestral", progress=False).images[0]
    assert len(r.images) == 1 and max_diff(r.image, want) == 0
    assert r.info["seed"] == 21 and r.info["all_seeds"] == [21] and r.info["sampler_name"] == "Euler a"
    assert r.info["fastsd_scheduler"] == "euler-ancestral" and r.info["width"] == 64 and r.info["steps"] == STEPS
    assert "Seed: 21" in r.info["infotexts"][0] and r.parameters["prompt"] == "a red circle"
    # seed -1: drawn, reported, and it reproduces the image
    r = api.txt2img(prompt="a green square", seed=-1, width=64, height=64)
    again = api.txt2img(prompt="a green square", seed=r.info["seed"], width=64, height=64)
    assert max_diff(r.image, again.image) == 0


def test_batches_take_consecutive_seeds(api, shapes_engine):
    r = api.txt2img(prompt="a blue triangle", seed=40, batch_size=2, n_iter=2, width=64, height=64)
    assert len(r.images) == 4 and r.info["all_seeds"] == [40, 41, 42, 43]
    single = api.txt2img(prompt="a blue triangle", seed=42, width=64, height=64)
    assert max_diff(r.images[2], single.image) <= 1  # a batch of 4 may differ from one image by one level


def test_lora_tag_in_the_prompt(api, shapes_api_deployment):
    dep = shapes_api_deployment
    tagged = api.txt2img(prompt="a red circle <lora:speckle:0.8>", seed=3, width=64, height=64)
    assert tagged.info["extra_generation_params"] == {"Lora": "speckle:0.8"}
    doc = {"input_data": {"columns": ["prompt"], "data": ["a red circle "],
                          "parameters": {"lora": "speckle:0.8", "seed": 3, "num_inference_steps": STEPS,
                                         "guidance_scale": 7.0, "scheduler": "euler", "width": 64, "height": 64}}}
    r = httpx.post(dep["url"] + "/score", json=doc, headers={"Authorization": "Bearer " + dep["token"]}, timeout=120)
    score = Image.open(io.BytesIO(base64.b64decode(r.json()[0]["generated_image"])))
    assert max_diff(tagged.image, score) == 0
    plain = api.txt2img(prompt="a red circle", seed=3, width=64, height=64)
    assert max_diff(tagged.image, plain.image) > 10  # the adapter changed it
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a red circle <lora:nosuch:1>", width=64, height=64)
    assert e.value.args[0] == 422 and "speckle" in json.loads(e.value.args[1])["detail"]


def test_img2img_and_inpainting(api, shapes_engine):
    r = api.img2img(images=[drawn()], prompt="a blue circle", denoising_strength=0.6, seed=5, width=64, height=64)
    want = shapes_engine.generate("a blue circle", image=drawn(), strength=0.6, num_inference_steps=STEPS, seed=5,
                                  guidance_scale=7.0, scheduler="euler", progress=False).images[0]
    assert max_diff(r.image, want) == 0 and r.info["denoising_strength"] == 0.6
    assert r.parameters["init_images"] is None
    # inpainting with mask_blur 0 and inpainting_fill 1 ("original") is fastsd's inpainting, nothing added
    kw = dict(images=[drawn()], mask_image=corner(), prompt="a yellow square", denoising_strength=0.9, seed=5,
              width=64, height=64)
    r = api.img2img(mask_blur=0, inpainting_fill=1, inpaint_full_res=False, **kw)
    want = shapes_engine.generate("a yellow square", image=drawn(), mask_image=corner(), strength=0.9,
                                  num_inference_steps=STEPS, seed=5, guidance_scale=7.0, scheduler="euler",
                                  progress=False).images[0]
    assert max_diff(r.image, want) == 0 and r.info["fastsd_ignored"] == {}
    # webuiapi's defaults (blur 4, fill 0, only masked): the same image, and the answer says what was ignored
    r = api.img2img(**kw)
    assert max_diff(r.image, want) == 0
    assert r.info["fastsd_ignored"] == {"mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True}
    inverted = api.img2img(inpainting_mask_invert=1, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                           **{**kw, "mask_image": corner().point(lambda v: 255 - v)})
    assert max_diff(inverted.image, want) == 0
    # width x height other than the image's: resized first (A1111's resize_mode 0)
    r = api.img2img(images=[drawn().resize((96, 96))], prompt="a blue circle", denoising_strength=0.6, seed=5,
                    width=64, height=64)
    assert r.image.size == (64, 64)


def test_listings_options_progress(api, shapes_api_deployment):
    assert [m["title"] for m in api.get_sd_models()] == ["fastsd-shapes"]
    assert api.util_get_current_model() == "fastsd-shapes"
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DDIM", "PLMS", "LMS", "DPM++ 2M"} <= set(names)
    assert api.util_get_scheduler_names() == ["automatic"]
    assert [(lo["name"], lo["alias"]) for lo in api.get_loras()] == [("speckle", "speckle")]
    assert api.set_options({"sd_model_checkpoint": "fastsd-shapes"}) is None  # A1111 answers null
    r = api.set_options({"sd_model_checkpoint": "sd_xl_base_1.0", "CLIP_stop_at_last_layers": 1})
    assert r["param"] == "sd_model_checkpoint" and "fastsd-shapes" in r["detail"]
    assert api.set_options({"CLIP_stop_at_last_layers": 2})["param"] == "CLIP_stop_at_last_layers"
    p = api.get_progress()
    assert p["progress"] == 0.0 and p["state"]["job_count"] == 0


BAD = [  # (txt2img keywords, the field the 422 names)
    ({"sampler_name": "Heun"}, "sampler_name"), ({"scheduler": "Karras"}, "scheduler"), ({"steps": 0}, "steps"),
    ({"cfg_scale": "x"}, "cfg_scale"), ({"width": 65}, "width"), ({"seed": -7}, "seed"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 8, "n_iter": 4}, "batch_size"), ({"prompt": ""}, "prompt"), ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"), ({"override_settings": {"sd_model_checkpoint": "other"}},
                                                 "sd_model_checkpoint"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
]


def test_bad_bodies_are_422_with_the_field(api, shapes_api_deployment):
    dep = shapes_api_deployment
    for kw, field in BAD:
        with pytest.raises(RuntimeError) as e:
            api.txt2img(**{"prompt": "x", "width": 64, "height": 64, **kw})
        status, text = e.value.args
        assert status == 422 and json.loads(text)["param"] == field, (kw, text)
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="Heun", width=64, height=64)
    assert "Euler a, Euler, LMS, DPM++ 2M, DDIM, PLMS" in json.loads(e.value.args[1])["detail"]
    h = {"Authorization": "Bearer " + dep["token"], "Content-Type": "application/json"}
    for raw, status in ((b"{not json", 422), (b"[1]", 422), (json.dumps({"prompt": "x", "init_images": []}), 422)):
        r = httpx.post(dep["url"] + "/sdapi/v1/img2img", content=raw, headers=h)
        assert r.status_code == status and "detail" in r.json(), r.text
    with pytest.raises(RuntimeError) as e:
        api.img2img(images=[drawn()], mask_image=Image.new("L", (32, 32)), prompt="x", width=64, height=64,
                    resize_mode=1)
    assert e.value.args[0] == 422


def test_the_token(shapes_api_deployment):
    dep = shapes_api_deployment
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=dep["rest_port"], steps=STEPS)
    assert "token" in anonymous.get_sd_models()["detail"]  # webuiapi hands back the error body of a listing
    with pytest.raises(RuntimeError) as e:
        anonymous.txt2img(prompt="x", width=64, height=64)
    assert e.value.args[0] == 401
    assert httpx.get(dep["url"] + "/sdapi/v1/sd-models").status_code == 401
    assert httpx.post(dep["url"] + "/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
    basic = webuiapi.WebUIApi(host="127.0.0.1", port=dep["rest_port"], steps=STEPS, username="anyone",
                              password=dep["token"])  # A1111's --api-auth: the token is the password
    assert basic.util_get_model_names() == ["fastsd-shapes"]
    wrong = webuiapi.WebUIApi(host="127.0.0.1", port=dep["rest_port"], username="anyone", password="wrong")
    assert wrong.session.get(wrong.baseurl + "/options").status_code == 401


def test_progress_and_interrupt(api):
    import threading
    import time
    out = {}
    job = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="a long one", seed=1, steps=150,
                                                                   width=256, height=256)))
    job.start()
    seen = None
    for _ in range(600):
        p = api.get_progress()
        if p["state"]["sampling_step"] > 0:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None and 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150
    assert seen["state"]["job_count"] == 1 and seen["state"]["job"] == "txt2img" and seen["eta_relative"] > 0
    api.interrupt()
    job.join(60)
    r = out["r"]
    assert r.images == [] and r.info["interrupted"] is True and "interrupted at step" in r.info["fastsd_message"]
    assert api.get_progress()["state"]["job_count"] == 0
    assert len(api.txt2img(prompt="after", seed=1, width=64, height=64).images) == 1  # it goes on serving
