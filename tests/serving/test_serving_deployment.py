"""A real deployment on loopback: `fastsd serve` (2 replicas of the tiny model, REST with a token),
queried by MII's unchanged client from separate processes and from threads, over REST, with bad
requests, one replica killed mid-run, and `fastsd stop`. One deployment is shared by the module
(each serving process costs ~350 MB and seconds of imports); tests run in file order."""
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import fastapi  # noqa: E402,F401 - the serving extra: `make test` installs it, so a missing one fails, not skips
import mii  # noqa: E402,F401
import uvicorn  # noqa: E402,F401
from PIL import Image

from deployment_cleanup import end_deployment
from fastsd.serving import folders, ports, processes

pytestmark = pytest.mark.timeout(300)
TOKEN = "test-token-123"
STEPS = 30
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=120, check=True):
    proc = subprocess.run([sys.executable, "-m", "fastsd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **ENV))
    if check and proc.returncode != 0:
        raise AssertionError(f"fastsd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mii")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    port = ports.free_port_block(3)
    rest_port = ports.free_port_block(1)
    name = f"t{os.getpid()}"
    info = {"name": name, "port": port, "rest_port": rest_port, "cache": cache, "dir": cache / name}
    try:
        run_cli("serve", "--model", "tiny", "--deployment", name, "--replicas", "2", "--port", str(port),
                "--rest-port", str(rest_port), "--token", TOKEN, "--threads", "1", "--max-batch", "8",
                "--batch-window-ms", "150", "--max-prompts", "4", "--max-steps", "100", "--timeout", "60",
                "--max-body-bytes", "4096", "--startup-timeout", "500", timeout=560)  # a busy shared machine
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


def direct(engine, prompt, seed, steps=STEPS, guidance=7.5):
    return engine.generate([prompt], [""], num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                           progress=False).images[0]


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def status(name) -> dict:
    from fastsd.serving.status import status as deployment_status
    return deployment_status(name)


def mii_client(name):
    """MII's client binds to the event loop it is made in: one loop and one handle per thread."""
    import mii
    asyncio.set_event_loop(asyncio.new_event_loop())
    return mii.legacy.mii_query_handle(name)


def concurrent_queries(name, jobs, steps=STEPS):
    out = [None] * len(jobs)

    def work(i):
        try:
            c = mii_client(name)
            prompt, seed = jobs[i]
            out[i] = c.query({"prompt": [prompt], "negative_prompt": [""]}, num_inference_steps=steps,
                             guidance_scale=7.5, seed=seed).images[0]
        except Exception as e:  # noqa: BLE001
            out[i] = e
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    return threads, out


def http(port, path, body=None, token=TOKEN, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# -- tests -------------------------------------------------------------------------------------------
def test_status(deployment):
    s = json.loads(run_cli("status", deployment["name"], "--json").stdout)
    assert s["status"] == "running" and s["model"] == "tiny" and s["backend"] == "torch"
    assert [r["state"] for r in s["replicas"]] == ["up", "up"]
    assert [r["port"] for r in s["replicas"]] == [deployment["port"] + 1, deployment["port"] + 2]
    assert s["port"] == deployment["port"] and s["rest_port"] == deployment["rest_port"] and s["uptime_s"] > 0
    assert (deployment["dir"] / "score.py").exists()  # MII's deployment record


def test_mii_client_in_another_process_matches_the_engine(deployment, engine, tmp_path):
    out = tmp_path / "out.png"
    code = f"""
import mii
client = mii.legacy.mii_query_handle({deployment['name']!r})
reply = client.query({{"prompt": ["a red cube"], "negative_prompt": [""]}}, num_inference_steps={STEPS},
                     guidance_scale=7.5, seed=1)
reply.images[0].save({str(out)!r}); print("nsfw", reply.nsfw_content_detected)
top = mii.mii_query_handle({deployment['name']!r})  # the name MII exports at top level
print("top", len(top.query({{"prompt": ["a red cube"], "negative_prompt": [""]}}, num_inference_steps=2).images))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **ENV), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nsfw [False]" in proc.stdout and "top 1" in proc.stdout
    assert max_diff(Image.open(out), direct(engine, "a red cube", 1)) <= 1


@pytest.mark.slow  # a CLI process of its own: tens of seconds on 2 cores
def test_fastsd_query(deployment, engine, tmp_path):
    proc = run_cli("query", deployment["name"], "a red cube", "--steps", str(STEPS), "--seed", "1",
                   "--out", str(tmp_path / "q.png"))
    assert str(tmp_path / "q.png") in proc.stdout
    assert max_diff(Image.open(tmp_path / "q.png"), direct(engine, "a red cube", 1)) <= 1
    bad = run_cli("query", deployment["name"], "a", "--steps", "1000", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "INVALID_ARGUMENT: num_inference_steps" in bad.stderr


def test_eight_concurrent_clients_batched_and_shared(deployment, engine):
    before = status(deployment["name"])
    jobs = [(f"prompt number {i}", 100 + i) for i in range(8)]
    threads, out = concurrent_queries(deployment["name"], jobs)
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for (prompt, seed), image in zip(jobs, out):
        assert not isinstance(image, Exception), image
        assert max_diff(image, direct(engine, prompt, seed)) <= 1
    after = status(deployment["name"])
    merged = after["totals"]["merged_batches"] - before["totals"].get("merged_batches", 0)
    assert merged >= 1, after["totals"]
    per_replica = [a.get("requests", 0) - b.get("requests", 0) for a, b in zip(after["replicas"], before["replicas"])]
    assert all(n >= 2 for n in per_replica), per_replica  # both replicas took a share
    assert after["requests_served"] - before["requests_served"] == 8


def test_rest_model_card_sample(deployment, engine):
    assert http(deployment["rest_port"], "/health", token=None) == (200, {"status": "ok",
                                                                          "deployment": deployment["name"]})
    sample = {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"],
                             "index": [0], "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}
    code, body = http(deployment["rest_port"], "/score", json.dumps(sample).encode())
    assert code == 200 and len(body) == 1
    assert body[0]["prompt"] == "a photograph of an astronaut riding a horse"
    assert body[0]["nsfw_content_detected"] is False
    image = Image.open(io.BytesIO(base64.b64decode(body[0]["generated_image"])))
    assert image.format == "PNG" and image.size == (64, 64)
    sample["input_data"]["parameters"] = {"num_inference_steps": STEPS, "seed": 7}
    code, body = http(deployment["rest_port"], "/score", json.dumps(sample).encode())
    got = Image.open(io.BytesIO(base64.b64decode(body[0]["generated_image"])))
    assert code == 200 and max_diff(got, direct(engine, sample["input_data"]["data"][0], 7)) <= 1


def test_rest_bad_requests(deployment):
    port = deployment["rest_port"]

    def score(doc, **kw):
        return http(port, "/score", doc if isinstance(doc, bytes) else json.dumps(doc).encode(), **kw)
    good = {"input_data": {"columns": ["prompt"], "data": ["a"], "parameters": {"num_inference_steps": 2}}}
    assert score(good, token=None)[0] == 401
    assert score(good, token="wrong")[0] == 401
    assert score(b"{not json")[0] == 400
    assert score({"input_data": {"columns": ["text"], "data": ["a"]}})[0] == 400  # no prompt column
    assert score({"input_data": {"columns": ["prompt"], "data": []}})[0] == 400
    code, body = score({"input_data": {"data": ["a"], "parameters": {"num_inference_steps": "fifty"}}})
    assert code == 422 and body["parameter"] == "num_inference_steps" and "fifty" in body["error"]
    code, body = score({"input_data": {"data": ["a"], "parameters": {"num_inference_steps": 101}}})
    assert code == 422 and "[1, 100]" in body["error"]
    assert score({"input_data": {"data": ["a"], "parameters": {"height": 100}}})[1]["parameter"] == "height"
    code, body = score({"input_data": {"data": ["a"] * 5}})
    assert code == 422 and "at most 4" in body["error"]
    code, body = score({"input_data": {"data": ["a" * 5000]}})
    assert code == 413 and body["limit"] == 4096
    assert score({"input_data": {"data": [None]}})[0] == 422
    assert score(good)[0] == 200  # still serving


def test_grpc_bad_requests(deployment):
    import grpc
    client = mii_client(deployment["name"])
    for kw, name in [({"num_inference_steps": 5000}, "num_inference_steps"), ({"seed": "x"}, "seed"),
                     ({"height": 100}, "height"), ({"guidance_scale": -2.0}, "guidance_scale"),
                     ({"strength": 0.5}, "strength")]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            client.query({"prompt": ["a"], "negative_prompt": [""]}, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(name), kw
    for prompts in ([], ["a"] * 5, [" "]):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            client.query({"prompt": prompts, "negative_prompt": [""] * len(prompts)})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("prompt")
    assert len(client.query({"prompt": ["a"], "negative_prompt": [""]}, num_inference_steps=2).images) == 1


@pytest.mark.slow  # a CLI process of its own: tens of seconds on 2 cores
def test_second_serve_refused(deployment):
    p = run_cli("serve", "--model", "tiny", "--deployment", deployment["name"], "--port", str(deployment["port"] + 10),
                check=False, timeout=60)
    assert p.returncode == 2 and "already running" in p.stderr
    from fastsd.serving.errors import ServingError
    from fastsd.serving.deploy import serve
    for port, rest, taken in [(deployment["port"], None, deployment["port"]),  # the load balancer's
                              (deployment["port"] - 1, None, deployment["port"]),  # replica 0 would take it
                              (ports.free_port_block(2), deployment["rest_port"], deployment["rest_port"])]:
        with pytest.raises(ServingError, match=f"port {taken} .*in use.*{deployment['name']}"):
            serve(name=deployment["name"] + "b", model="tiny", port=port, rest_port=rest)
    assert not (deployment["cache"] / (deployment["name"] + "b") / "state.json").exists()


@pytest.mark.slow  # a replica restart: tens of seconds on 2 cores
def test_killed_replica_loses_nothing_and_recovers(deployment, engine):
    name = deployment["name"]
    victim = status(name)["replicas"][1]
    failovers = status(name)["balancer"]["failovers"]
    jobs = [(f"kill test {i}", 200 + i) for i in range(8)]
    threads, out = concurrent_queries(name, jobs, steps=60)
    [t.start() for t in threads]
    time.sleep(0.5)  # requests are queued or running on both replicas
    os.kill(victim["pid"], signal.SIGKILL)
    [t.join(120) for t in threads]
    for (prompt, seed), image in zip(jobs, out):
        assert not isinstance(image, Exception), image  # failed over, none lost
        assert max_diff(image, direct(engine, prompt, seed, steps=60)) <= 1
    end = time.monotonic() + 10  # the balancer writes its counters every 0.5 s
    while status(name)["balancer"]["failovers"] == failovers and time.monotonic() < end:
        time.sleep(0.2)
    assert status(name)["balancer"]["failovers"] > failovers  # the requests it held were sent elsewhere
    end = time.monotonic() + 120
    while time.monotonic() < end:  # restarted by the supervisor, and back in the balancer's rotation
        s = status(name)
        r = s["replicas"][1]
        if r["state"] == "up" and r["pid"] != victim["pid"] and s["balancer"]["up"] == [True, True]:
            break
        time.sleep(0.25)
    assert r["state"] == "up" and r["restarts"] == 1 and s["balancer"]["up"] == [True, True], s
    before = s["balancer"]["forwarded"]
    threads, out = concurrent_queries(name, [(f"after {i}", i) for i in range(4)], steps=2)
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not any(isinstance(o, Exception) for o in out), out
    end = time.monotonic() + 10
    while time.monotonic() < end:  # the balancer writes its counters every 0.5 s
        after = status(name)["balancer"]["forwarded"]
        if sum(after) >= sum(before) + 4:
            break
        time.sleep(0.1)
    assert after[1] > before[1], (before, after)  # the restarted replica takes its share again


def test_stop_leaves_nothing(deployment):
    name = deployment["name"]
    state = folders.read_json(deployment["dir"] / "state.json")
    pids = [state["supervisor_pid"]] + [c["pid"] for c in state["children"].values()]
    assert all(processes.pid_alive(p) for p in pids)
    p = run_cli("stop", name, timeout=60)
    assert "stopped deployment" in p.stdout
    assert not any(processes.pid_alive(p) for p in pids)
    used = [deployment["port"], deployment["port"] + 1, deployment["port"] + 2, deployment["rest_port"]]
    assert all(ports.port_free(p) for p in used)
    assert not (deployment["dir"] / "score.py").exists()
    assert run_cli("status", name, check=False).returncode == 3
