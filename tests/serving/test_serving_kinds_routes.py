"""Depth maps and the x4 upscaler through the serving front doors: the `depth_map` query keyword (REST /score
`parameters`, MII query kwargs) as a base64 grayscale PNG or .npy, and A1111's /sdapi/v1/img2img to an upscaler
deployment (init image -> 4x image). All of it through the one parser (request.py) and the batcher, over the tiny
models, in one process: the gateway's app with a deployment client that packs the keywords as MII packs them
(MII's Value messages) and hands them to a replica's BatchingPipeline. A live deployment runs them too
(test_kinds_live_deployments, slow)."""
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")  # the serving extra
import mii  # noqa: E402,F401 - the serving extra
from starlette.testclient import TestClient  # noqa: E402

from fastsd import images as imgs  # noqa: E402
from fastsd import load_model, optimize  # noqa: E402
from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.serving import proto, schema  # noqa: E402
from fastsd.serving.batcher import BatchingPipeline  # noqa: E402
from fastsd.serving.errors import DeploymentError  # noqa: E402
from fastsd.serving.gateway import Gateway  # noqa: E402
from fastsd.serving.request import Limits, parse, parse_score_body  # noqa: E402
from fastsd.serving.rest import create_app  # noqa: E402
from fastsd.serving.spec import DeploymentSpec, ReplicaPlacement  # noqa: E402
from fastsd.verify_kinds import sample_image  # noqa: E402

LIM = Limits(max_pixels=512 * 512)
STEPS = 3


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png16(arr) -> bytes:
    """An HxW map as a 16-bit grayscale PNG."""
    a = np.asarray(arr, np.float64)
    scaled = np.round((a - a.min()) / (a.max() - a.min()) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(scaled).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, np.float32))
    return buf.getvalue()


def ramp(h=48, w=40):
    """A depth map unlike verify's radial one: nearer towards the bottom right."""
    y, x = np.mgrid[0:h, 0:w]
    return (x / w + 2 * y / h).astype(np.float32)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# -- the parser ---------------------------------------------------------------------------------------
def test_parse_takes_a_depth_map_png_or_npy():
    image = sample_image((64, 64))
    for data in (png16(ramp()), npy(ramp())):
        r = parse(["a", "b"], None, {"depth_map": b64(data), "strength": 0.7}, LIM, 64, image=[image],
                  unet_in_channels=5)
        assert r.task == "depth" and len(r.depth_maps) == 2 and r.depth_maps[0].shape == (48, 40)
        got = r.depth_maps[0]
        assert np.corrcoef(got.ravel(), ramp().ravel())[0, 1] > 0.999  # the same map (PNG: 16-bit levels)
    without = parse("a", None, {"strength": 0.7}, LIM, 64, image=[image], unet_in_channels=5)
    assert without.depth_maps is None and without.key != r.key  # sent or estimated maps never share a batch
    # REST: the keyword is text through /score (and MII's Value), decoded only by the replica
    q = parse_score_body({"input_data": {"data": ["a"], "parameters": {"depth_map": "data:image/png;base64,"
                                                                       + b64(png16(ramp()))}}}, LIM)
    assert q.parameters["depth_map"] == b64(png16(ramp()))
    assert schema.unpack_query_kwargs(proto.query_kwargs(q.parameters)) == q.parameters


@pytest.mark.parametrize("kwargs, channels, images, match", [
    ({"depth_map": "not base64!"}, 5, 1, "depth_map: got 'text that is not base64'; allowed: a base64-encoded "
                                         "grayscale PNG"),
    ({"depth_map": 7}, 5, 1, "depth_map: got 7; allowed: a base64"),
    ({"depth_map": b64(b"GIF89a....")}, 5, 1, "depth_map: got 'data that is neither a PNG nor a .npy array'"),
    ({"depth_map": b64(imgs.encode_png(sample_image((8, 8))))}, 5, 1, "depth_map: got 'a RGB PNG'; allowed: a "
                                                                       "grayscale PNG"),
    ({"depth_map": b64(npy(np.zeros((2, 3, 4))))}, 5, 1, r"depth_map: got 'a float32 array of shape \(2, 3, 4\)'"),
    ({"depth_map": b64(npy(np.zeros((1024, 1024))))}, 5, 1, "depth_map: got 'a 1024x1024 map'; allowed: at most "
                                                             "262144 values"),
    ({"depth_map": b64(png16(ramp()))}, 5, 2, "depth_map: got 'one map for several images'"),
    ({"depth_map": b64(png16(ramp())), "strength": 0.01, "num_inference_steps": 10}, 5, 1,
     "strength: got 0.01; allowed: at least 1/10 with 10 steps"),
    ({"depth_map": b64(png16(ramp()))}, 7, 1, "depth_map: got 'a depth map'; allowed: only with a depth-to-image"),
    ({"depth_map": b64(png16(ramp()))}, 4, 1, "depth_map: got 'a depth map'; allowed: only with a depth-to-image"),
])
def test_parse_refuses_bad_depth_maps(kwargs, channels, images, match):
    image = sample_image((16, 16) if channels == 7 else (64, 64))
    with pytest.raises(InvalidParameter, match=match):
        parse(["a", "b"][:images], None, kwargs, LIM, 64, image=[image] * images, unet_in_channels=channels)


# -- the routes, on an in-process deployment ----------------------------------------------------------
class InProcessClient:
    """DeploymentClient's stand-in: keywords packed into MII's Value messages and unpacked as a replica unpacks
    them, images decoded, then the replica's BatchingPipeline (parse, batch, engine); a refusal comes back as
    the replica's servicer sends it (INVALID_ARGUMENT)."""

    def __init__(self, engine):
        self.kind = engine.model.kind
        self.pipe = BatchingPipeline(engine, limits=LIM, max_batch=2, window=0.01)
        self.sent = []

    def engine(self):
        return {"kind": self.kind}

    def generate(self, prompts, negatives=None, *, image=None, mask_image=None, timeout=None, cancel=None,
                 request_id=None, probe=False, **kwargs):
        kw = schema.unpack_query_kwargs(proto.query_kwargs({k: v for k, v in kwargs.items() if v is not None}))
        self.sent.append(kw)
        decoded = [imgs.decode(b, "image") for b in image or []]
        masks = [imgs.decode(b, "mask_image", mode="L") for b in mask_image or []]
        try:
            reply = self.pipe.handle(list(prompts), list(negatives or []), kw, image=decoded or None,
                                     mask_image=masks or None)
        except InvalidParameter as e:  # what the replica's servicer answers (gRPC INVALID_ARGUMENT)
            raise DeploymentError("INVALID_ARGUMENT", str(e)) from None
        return SimpleNamespace(images=reply.images, nsfw_content_detected=reply.nsfw_content_detected,
                               queue_ms=0.0, engine_ms=0.0)


def app_for(preset):
    engine = optimize(load_model(preset), dtype="fp32", safety_checker=False)
    spec = DeploymentSpec(name="kinds", model=preset, replicas=[ReplicaPlacement(0, "127.0.0.1", 1, "127.0.0.1")],
                          limits=LIM, max_batch=2)
    client = InProcessClient(engine)
    return TestClient(create_app(spec, None, Gateway(spec, client, ThreadPoolExecutor(4), None))), client, engine


def score_image(r):
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()[0]["generated_image"])))


def test_depth_map_over_score_and_the_mii_query_and_a1111_img2img_to_the_upscaler():
    """One test, both kinds: a depth deployment's /score with a PNG depth map and its MII query with a .npy one,
    each the engine's own image for that map (and not the estimator's); bad maps answered 422 naming the
    field while the deployment goes on; then an upscaler deployment's A1111 img2img, init image -> 4x."""
    http, client, engine = app_for("tiny-depth")
    image = sample_image((64, 64))
    want = engine.generate("a statue", num_inference_steps=STEPS, seed=5, image=image, depth_map=ramp(),
                           strength=0.8, progress=False).images[0]
    doc = {"input_data": {"columns": ["prompt", "image"], "data": [["a statue", b64(imgs.encode_png(image))]],
                          "parameters": {"depth_map": b64(png16(ramp())), "num_inference_steps": STEPS, "seed": 5,
                                         "strength": 0.8}}}
    got = score_image(http.post("/score", json=doc))
    assert max_diff(got, want) <= 2  # the PNG carries the map in 16-bit levels
    estimated = engine.generate("a statue", num_inference_steps=STEPS, seed=5, image=image, strength=0.8,
                                progress=False).images[0]
    assert max_diff(got, estimated) > 10  # the map was used, not the estimator's
    # the MII query: the keyword as MII's client packs it (a .npy map, exact)
    reply = client.generate(["a statue"], [""], image=[imgs.encode_png(image)], depth_map=b64(npy(ramp())),
                            num_inference_steps=STEPS, seed=5, strength=0.8)
    assert max_diff(reply.images[0], want) <= 1
    for bad, match in [("%%%", "depth_map: got 'text that is not base64'"),
                       (b64(b"not an image"), "depth_map: got 'data that is neither a PNG nor a .npy array'")]:
        doc["input_data"]["parameters"]["depth_map"] = bad
        r = http.post("/score", json=doc)
        assert r.status_code == 422 and match in r.json()["error"], r.text
    doc["input_data"]["parameters"]["depth_map"] = b64(npy(ramp()))
    assert max_diff(score_image(http.post("/score", json=doc)), want) <= 1  # still serving

    http, client, engine = app_for("tiny-upscaler")
    low = sample_image((16, 24))
    want = engine.generate("a cat", num_inference_steps=STEPS, seed=9, image=low, noise_level=40, scheduler="euler",
                           guidance_scale=7.0, progress=False).images[0]
    body = {"prompt": "a cat", "init_images": [b64(imgs.encode_png(low))], "denoising_strength": 0.75,
            "width": 512, "height": 512, "steps": STEPS, "seed": 9, "sampler_name": "Euler", "noise_level": 40}
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    info = json.loads(r.json()["info"])
    assert out.size == (64, 96) and (info["width"], info["height"]) == (64, 96) and max_diff(out, want) <= 1
    assert info["fastsd_ignored"] == {"denoising_strength": 0.75, "width": 512, "height": 512}
    assert info["denoising_strength"] is None and "strength" not in client.sent[-1]
    for change, match in [({"noise_level": 400}, "noise_level: got 400; allowed: an integer in [0, 350]"),
                          ({"mask": b64(imgs.encode_png(low))}, "mask: got a mask; allowed: none"),
                          ({"init_images": []}, "init_images: got 0 images")]:
        r = http.post("/sdapi/v1/img2img", json={**body, **change})
        assert r.status_code == 422 and match in r.json()["detail"], r.text
    r = http.post("/sdapi/v1/img2img", json={**body, "width": 64, "height": 96})  # 4x the input: not ignored
    assert r.status_code == 200 and json.loads(r.json()["info"])["fastsd_ignored"] == {"denoising_strength": 0.75}


@pytest.mark.parametrize("preset", ["tiny-depth", "tiny-upscaler"])
def test_start_up_batch_probe_runs_the_models_own_task(preset):
    """A replica's start-up measurement (--max-batch auto, the default) calls the engine without a request:
    a depth or upscaler model needs an image there too (it once failed the deployment's start)."""
    from fastsd.serving.batch_size import engine_run, probe_task
    engine = optimize(load_model(preset), dtype="fp32", safety_checker=False)
    task = probe_task(engine.model)
    assert task == ("depth" if preset == "tiny-depth" else "upscale")
    seconds = []
    run = engine_run(engine, 64, 64, 2, 7.5, clock=lambda: seconds.append(0) or float(len(seconds)))
    assert run(2) == 1.0  # two images in one call, timed by the given clock


def test_query_cli_checks_its_kind_options_before_connecting(tmp_path, capsys):
    from fastsd.cli import main
    image = tmp_path / "in.png"
    sample_image((64, 64)).save(image)
    rgb = tmp_path / "rgb.png"
    sample_image((8, 8)).save(rgb)
    for argv, match in [(["--image", str(image), "--depth-map", str(tmp_path / "nosuch.png")],
                         "depth_map: got '" + str(tmp_path / "nosuch.png") + "'; allowed: an existing depth map"),
                        (["--image", str(image), "--depth-map", str(rgb)], "depth_map: got 'a RGB PNG'"),
                        (["--depth-map", str(rgb)], "depth_map: got '" + str(rgb) + "'; allowed: only together"),
                        (["--image", str(image), "--tile-size", "64"], "tile_size: got 64; allowed: nothing with query")]:
        assert main(["query", "nosuch-deployment", "a", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and err.count("\n") == 0, err


# -- live deployments (slow) --------------------------------------------------------------------------
def _serve(name, folder, cache, rest_port, port):
    import os
    import subprocess
    import sys
    argv = [sys.executable, "-m", "fastsd.cli", "serve", "--model", str(folder), "--deployment", name, "--port",
            str(port), "--rest-port", str(rest_port), "--threads", "1", "--startup-timeout", "400", "--timeout", "300"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MII_CACHE_PATH=str(cache))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=450, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kinds_live_deployments(tiny_depth_folder, tiny_upscaler_folder, tmp_path, monkeypatch):
    """The same through real deployments of the saved folders: `fastsd query --depth-map` and /score's depth_map
    on a depth deployment, `fastsd query --noise-level` and A1111 img2img on an upscaler deployment."""
    import os
    import subprocess
    import sys

    import httpx

    from deployment_cleanup import end_deployment
    from fastsd.serving import ports
    cache = tmp_path / "mii"
    monkeypatch.setenv("MII_CACHE_PATH", str(cache))  # where end_deployment's stop looks
    env = dict(os.environ, OMP_NUM_THREADS="1")
    image, low = tmp_path / "in.png", tmp_path / "low.png"
    sample_image((64, 64)).save(image)
    sample_image((16, 24)).save(low)
    np.save(tmp_path / "map.npy", ramp())

    def query(name, *argv):
        return subprocess.run([sys.executable, "-m", "fastsd.cli", "query", name, *argv], capture_output=True,
                              text=True, timeout=300, env=env)
    for kind, folder in (("depth", tiny_depth_folder), ("upscale", tiny_upscaler_folder)):
        name = f"{kind}{os.getpid()}"
        port, rest_port = ports.free_port_block(2), ports.free_port_block(1)
        engine = optimize(load_model(str(folder)), dtype="fp32")
        try:
            _serve(name, folder, cache, rest_port, port)
            url = f"http://127.0.0.1:{rest_port}"
            if kind == "depth":
                want = engine.generate("a statue", num_inference_steps=STEPS, seed=5, image=Image.open(image),
                                       depth_map=ramp(), strength=0.8, progress=False).images[0]
                r = query(name, "a statue", "--image", str(image), "--depth-map", str(tmp_path / "map.npy"),
                          "--strength", "0.8", "--steps", str(STEPS), "--seed", "5", "--out", str(tmp_path / "d.png"))
                assert r.returncode == 0, r.stderr
                assert max_diff(Image.open(tmp_path / "d.png"), want) <= 1
                doc = {"input_data": {"columns": ["prompt", "image"],
                                      "data": [["a statue", b64(image.read_bytes())]],
                                      "parameters": {"depth_map": b64(png16(ramp())), "num_inference_steps": STEPS,
                                                     "seed": 5, "strength": 0.8}}}
                assert max_diff(score_image(httpx.post(url + "/score", json=doc, timeout=300)), want) <= 2
                doc["input_data"]["parameters"]["depth_map"] = b64(b"no map")
                r = httpx.post(url + "/score", json=doc, timeout=300)
                assert r.status_code == 422 and "depth_map: got" in r.json()["error"], r.text
            else:
                want = engine.generate("a cat", num_inference_steps=STEPS, seed=9, image=Image.open(low),
                                       noise_level=40, scheduler="euler", guidance_scale=7.0,
                                       progress=False).images[0]
                r = query(name, "a cat", "--image", str(low), "--noise-level", "40", "--steps", str(STEPS), "--seed",
                          "9", "--scheduler", "euler", "--guidance", "7", "--out", str(tmp_path / "u.png"))
                assert r.returncode == 0, r.stderr
                assert max_diff(Image.open(tmp_path / "u.png"), want) <= 1
                body = {"prompt": "a cat", "init_images": [b64(low.read_bytes())], "denoising_strength": 0.75,
                        "steps": STEPS, "seed": 9, "sampler_name": "Euler", "noise_level": 40}
                r = httpx.post(url + "/sdapi/v1/img2img", json=body, timeout=300)
                assert r.status_code == 200, r.text
                out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
                assert out.size == (64, 96) and max_diff(out, want) <= 1
        finally:
            end_deployment(name, cache / name)
