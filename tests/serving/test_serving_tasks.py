"""Image-to-image and inpainting through a real deployment (one replica of the tiny model, REST on): MII's
unchanged client on the `NAME-inpaint` record (InpaintingReply), image-to-image through the same RPC
without masks, `fastsd query --image/--mask`, Azure ML's REST formats, image URLs under --image-url-allow
(a local http.server), and the refusals (other URLs, redirects, oversized bodies, corrupt images,
decompression bombs) after which the replica goes on serving. Heavy (a deployment costs ~1 GB and a
minute): `-m slow`."""
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("mii")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastsd.serving import ports  # noqa: E402
from deployment_cleanup import end_deployment  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
STEPS = 6
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MAX_IMAGE_BYTES = 100_000


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


class ImageServer(BaseHTTPRequestHandler):
    """What --image-url-allow fetches from: /ok/circle.png, /ok/corner.png, a redirect, an oversized body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        files = {"/ok/circle.png": png(drawn()), "/ok/corner.png": png(corner())}
        if self.path in files:
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])
        elif self.path == "/ok/redirect.png":
            self.send_response(301)
            self.send_header("Location", "http://169.254.169.254/latest/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/ok/big.png":  # no Content-Length: only the byte count while streaming stops it
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\0" * 2 * MAX_IMAGE_BYTES)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, image_server):
    cache = tmp_path_factory.mktemp("mii")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    port, rest_port = ports.free_port_block(2), ports.free_port_block(1)
    name = f"img{os.getpid()}"
    info = {"name": name, "port": port, "rest_port": rest_port, "dir": cache / name, "cache": cache}
    try:
        proc = subprocess.run([sys.executable, "-m", "fastsd.cli", "serve", "--model", "tiny", "--deployment", name,
                               "--replicas", "1", "--port", str(port), "--rest-port", str(rest_port), "--threads",
                               "1", "--batch-window-ms", "300", "--max-pixels", "16384", "--max-body-bytes",
                               str(1 << 20), "--startup-timeout", "250", "--image-url-allow", image_server + "/ok/",
                               "--max-image-bytes", str(MAX_IMAGE_BYTES)], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, **ENV))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield info
    finally:
        try:
            end_deployment(name, info["dir"])
        finally:
            if old is None:
                os.environ.pop("MII_CACHE_PATH", None)
            else:
                os.environ["MII_CACHE_PATH"] = old


@pytest.fixture(scope="module")
def engine():
    from fastsd import load_model, optimize
    return optimize(load_model("tiny"), dtype="fp32")


def handle(name):
    import mii
    asyncio.set_event_loop(asyncio.new_event_loop())
    return mii.legacy.mii_query_handle(name)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def http(port, doc):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps(doc).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_mii_client_inpaints_through_the_inpaint_record(deployment, engine):
    client = handle(deployment["name"] + "-inpaint")
    assert client.task == "text-to-image-inpainting"
    reply = client.query({"prompt": ["a yellow square"], "image": [png(drawn())], "mask_image": [png(corner())],
                          "negative_prompt": [""]}, num_inference_steps=STEPS, seed=3)
    want = engine.generate("a yellow square", image=drawn(), mask_image=corner(), num_inference_steps=STEPS, seed=3,
                           progress=False).images[0]
    assert len(reply.images) == 1 and max_diff(reply.images[0], want) <= 1
    # image-to-image: the same RPC without masks (MII's client needs the key: an empty list)
    reply = client.query({"prompt": ["a blue circle"], "image": [png(drawn())], "mask_image": []},
                         num_inference_steps=STEPS, seed=4, strength=0.5)
    want = engine.generate("a blue circle", image=drawn(), strength=0.5, num_inference_steps=STEPS, seed=4,
                           progress=False).images[0]
    assert max_diff(reply.images[0], want) <= 1
    # text-to-image goes on through the deployment's own record
    assert len(handle(deployment["name"]).query({"prompt": ["a"], "negative_prompt": [""]},
                                                num_inference_steps=2).images) == 1


def test_bad_images_are_invalid_argument_and_the_replica_goes_on(deployment):
    import grpc
    client = handle(deployment["name"] + "-inpaint")
    bomb = png(Image.new("L", (3000, 3000)))  # 9 Mpixel in a few kB: refused from its header
    cases = [({"image": [b"not an image"], "mask_image": []}, "image: got 'data that is not an image'"),
             ({"image": [bomb], "mask_image": []}, "image: got '3000x3000 pixels'; allowed: at most 16384"),
             ({"image": [png(drawn())], "mask_image": [png(Image.new("L", (32, 32)))]}, "mask_image"),
             ({"image": [png(drawn())], "mask_image": []}, "strength")]
    for images, message in cases:
        kw = {"strength": 0.01} if message == "strength" else {}
        with pytest.raises(grpc.aio.AioRpcError) as e:
            client.query({"prompt": ["a"], **images}, num_inference_steps=STEPS, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(message), \
            e.value.details()
    assert len(client.query({"prompt": ["a"], "image": [png(drawn())], "mask_image": []},
                            num_inference_steps=2).images) == 1


def test_rest_azure_ml_inpainting_and_image_to_image(deployment, engine):
    b64 = base64.b64encode(png(drawn())).decode()
    mask = base64.b64encode(png(corner())).decode()
    doc = {"input_data": {"columns": ["prompt", "image", "mask_image", "negative_prompt"],
                          "data": [{"prompt": "a yellow square", "image": b64, "mask_image": mask,
                                    "negative_prompt": ""}], "index": [0],
                          "parameters": {"num_inference_steps": STEPS, "guidance_scale": 7.5, "seed": 3}}}
    code, body = http(deployment["rest_port"], doc)
    assert code == 200 and set(body[0]) == {"prompt", "generated_image", "nsfw_content_detected"}
    got = Image.open(io.BytesIO(base64.b64decode(body[0]["generated_image"])))
    want = engine.generate("a yellow square", image=drawn(), mask_image=corner(), num_inference_steps=STEPS, seed=3,
                           progress=False).images[0]
    assert max_diff(got, want) <= 1
    doc = {"input_data": {"columns": ["prompt", "image"], "data": [["a blue circle", b64]],
                          "parameters": {"num_inference_steps": STEPS, "strength": 0.5, "seed": 4}}}
    code, body = http(deployment["rest_port"], doc)
    assert code == 200 and len(body) == 1
    url = {"input_data": {"columns": ["prompt", "image"], "data": [["a", "http://169.254.169.254/latest/x.png"]]}}
    code, body = http(deployment["rest_port"], url)
    assert code == 422 and body["parameter"] == "image" and "outside the allowed prefixes" in body["error"]
    bad = {"input_data": {"columns": ["prompt", "image"], "data": [["a", base64.b64encode(b"junk").decode()]]}}
    code, body = http(deployment["rest_port"], bad)
    assert code == 422 and body["error"].startswith("image: got 'data that is not an image'")
    code, _ = http(deployment["rest_port"], doc)
    assert code == 200  # still serving


def test_rest_image_urls_under_the_allow_list(deployment, engine, image_server):
    port = int(image_server.rsplit(":", 1)[1])
    doc = {"input_data": {"columns": ["prompt", "image", "mask_image"],
                          "data": [["a yellow square", image_server + "/ok/circle.png", image_server + "/ok/corner.png"]],
                          "parameters": {"num_inference_steps": STEPS, "seed": 3}}}
    code, body = http(deployment["rest_port"], doc)
    assert code == 200, body
    got = Image.open(io.BytesIO(base64.b64decode(body[0]["generated_image"])))
    want = engine.generate("a yellow square", image=drawn(), mask_image=corner(), num_inference_steps=STEPS, seed=3,
                           progress=False).images[0]
    assert max_diff(got, want) <= 1  # fetched, then the same image as from base64
    for url, column, message in [
            (f"http://127.0.0.1:{port + 1}/ok/circle.png", "image", "outside the allowed prefixes"),
            (image_server + "/other/circle.png", "image", "outside the allowed prefixes"),
            (image_server + "/ok/redirect.png", "image", "redirect (HTTP 301); redirects are not followed"),
            (image_server + "/ok/big.png", "mask_image", "larger than"),
            (image_server + "/ok/missing.png", "mask_image", "HTTP 404")]:
        row = [image_server + "/ok/circle.png", url] if column == "mask_image" else [url, image_server + "/ok/corner.png"]
        bad = {"input_data": {"columns": ["prompt", "image", "mask_image"], "data": [["a", *row]]}}
        code, body = http(deployment["rest_port"], bad)
        assert code == 422 and body["parameter"] == column and message in body["error"], (url, body)
    code, _ = http(deployment["rest_port"], doc)
    assert code == 200  # still serving


def test_query_cli_sends_images(deployment, engine, tmp_path):
    png_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    drawn().save(png_path)
    corner().save(mask_path)
    env = dict(os.environ, **ENV, MII_CACHE_PATH=str(deployment["cache"]))

    def query(*argv):
        return subprocess.run([sys.executable, "-m", "fastsd.cli", "query", deployment["name"], *argv],
                              capture_output=True, text=True, timeout=200, env=env)
    r = query("a yellow square", "--image", str(png_path), "--mask", str(mask_path), "--steps", str(STEPS),
              "--seed", "3", "--out", str(tmp_path / "inpaint.png"))
    assert r.returncode == 0, r.stderr
    want = engine.generate("a yellow square", image=drawn(), mask_image=corner(), num_inference_steps=STEPS, seed=3,
                           progress=False).images[0]
    assert max_diff(Image.open(tmp_path / "inpaint.png"), want) <= 1
    r = query("a blue circle", "--image", str(png_path), "--strength", "0.5", "--steps", str(STEPS), "--seed", "4",
              "--out", str(tmp_path / "img2img.png"))
    assert r.returncode == 0, r.stderr
    want = engine.generate("a blue circle", image=drawn(), strength=0.5, num_inference_steps=STEPS, seed=4,
                           progress=False).images[0]
    assert max_diff(Image.open(tmp_path / "img2img.png"), want) <= 1
    r = query("a", "--image", str(png_path), "--strength", "0.01", "--steps", str(STEPS))  # the server's check
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "strength" in r.stderr, r.stderr


def test_stop_removes_both_records(deployment):
    from fastsd.serving.deploy import stop
    stop(deployment["name"], quiet=True)
    assert not (deployment["cache"] / deployment["name"] / "score.py").exists()
    assert not (deployment["cache"] / (deployment["name"] + "-inpaint") / "score.py").exists()
