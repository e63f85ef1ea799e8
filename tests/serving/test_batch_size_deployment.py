"""`fastsd serve` with `--max-batch auto` (the default) on the embedded model: the replica measures the
batch size at start-up before the deployment answers, `fastsd status` shows the choice and the
measurements, concurrent requests are served within it, and a new size is measured online."""
import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("mii")  # the serving extra (see README: Serve through DeepSpeed-MII)

from deployment_cleanup import end_deployment  # noqa: E402
from fastsd.serving import ports  # noqa: E402

# slow: the start-up measurement alone takes about a minute on 2 cores (the unit tests of the choice are in
# test_batch_size.py, in the default suite)
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "fastsd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **ENV))
    assert proc.returncode == 0, f"fastsd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mii")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    name = f"auto{os.getpid()}"
    ddir = cache / name
    try:
        run_cli("serve", "--model", "fastsd-shapes", "--deployment", name, "--port", str(ports.free_port_block(2)),
                "--threads", "1", "--batch-probe-steps", "2", "--batch-window-ms", "100", "--startup-timeout", "200",
                timeout=240)
        yield name
    finally:
        try:
            end_deployment(name, ddir)
        finally:
            if old is None:
                os.environ.pop("MII_CACHE_PATH", None)
            else:
                os.environ["MII_CACHE_PATH"] = old


def query_all(name, jobs):
    out = [None] * len(jobs)

    def work(i):
        import mii
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # MII's client: one loop per thread
        try:
            prompt, kw = jobs[i]
            out[i] = mii.legacy.mii_query_handle(name).query({"prompt": [prompt], "negative_prompt": [""]},
                                                             num_inference_steps=2, seed=i, **kw)
        except Exception as e:  # noqa: BLE001
            out[i] = e
        finally:
            loop.close()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    return out


def test_auto_measures_at_start_up_and_serves_within_its_choice(deployment):
    s = json.loads(run_cli("status", deployment, "--json").stdout)
    assert s["max_batch"] == "auto" and s["max_batch_limit"] == 8
    b = s["replicas"][0]["batching"]
    assert b["mode"] == "auto" and b["memory_budget_bytes"] > 0
    [native] = b["buckets"]  # measured before `serve` returned
    assert native["bucket"] == "text2img 64x64 1-4 steps guided" and native["source"] == "start-up"
    assert native["state"] == "decided" and native["chosen"] in (1, 2, 4, 8) and native["reason"]
    assert "1" in native["images_per_s"] and all(v > 0 for v in native["images_per_s"].values())
    human = run_cli("status", deployment).stdout
    assert "batching: auto" in human and "text2img 64x64 1-4 steps guided: " in human

    replies = query_all(deployment, [(f"a red circle {i}", {}) for i in range(6)])
    assert all(not isinstance(r, Exception) and r.images[0].size == (64, 64) for r in replies), replies
    s = json.loads(run_cli("status", deployment, "--json").stdout)
    r = s["replicas"][0]
    assert r["requests"] == 6 and 1 <= r["max_batch_images"] <= native["chosen"]


def test_another_size_is_measured_online(deployment):
    replies = query_all(deployment, [("a blue square", {"height": 72, "width": 80})] * 2)
    assert all(not isinstance(r, Exception) and r.images[0].size == (80, 72) for r in replies), replies
    s = json.loads(run_cli("status", deployment, "--json").stdout)
    online = [c for c in s["replicas"][0]["batching"]["buckets"] if c["bucket"].startswith("text2img 80x72")]
    assert online and online[0]["source"] == "online" and "1" in online[0]["images_per_s"]
