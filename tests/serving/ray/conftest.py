"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a worker, separate raylets,
one CPU each) with fastsd's Ray Serve application on it, for the tests of fastsd.serving.ray.

Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every node on 127.0.0.1, usage stats are off, the
dashboard is off, and RAY_TMPDIR is short (socket paths). One cluster at a time (about 3 GB)."""
import base64
import io
import json
import os
import time
import urllib.error
import urllib.request

import pytest

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
PROMPT, SEED, STEPS = "a red circle on a green square", 7, 4
os.environ.update(RAY_ENV)  # before anything imports ray: it reads them when imported


def score_body(seed: int = SEED, **params) -> bytes:
    return json.dumps({"input_data": {"columns": ["prompt"], "data": [PROMPT], "index": [0],
                                      "parameters": {"num_inference_steps": STEPS, "seed": seed,
                                                     "scheduler": "euler", **params}}}).encode()


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 400):
    """(status, headers, parsed JSON body) of one POST."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = raw.decode(errors="replace")
        return e.code, dict(e.headers), doc


def score_until_answered(url: str, body: bytes, deadline_s: float = 240, seen: list | None = None):
    """A client that retries on 503 (with its Retry-After) and on nothing else."""
    end = time.monotonic() + deadline_s
    while True:
        status, headers, doc = post(url + "/score", body)
        if status != 503 or time.monotonic() > end:
            return status, doc
        if seen is not None:
            seen.append(headers.get("Retry-After") or headers.get("retry-after"))
        time.sleep(float(headers.get("Retry-After") or headers.get("retry-after") or 1))


def image_of(doc):
    from PIL import Image
    return Image.open(io.BytesIO(base64.b64decode(doc[0]["generated_image"]))).convert("RGB")


def same(a, b) -> bool:
    import numpy as np
    x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    return x.shape == y.shape and bool((x == y).all())


def max_diff(a, b) -> int:
    import numpy as np
    x, y = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    assert x.shape == y.shape
    return int(np.abs(x - y).max())


def descendants() -> set[int]:
    import psutil
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


class RayApp:
    """A head + worker cluster, Serve's proxy on a free loopback port, fastsd's application as `fastsd`."""

    def __init__(self, tmp_root, args: dict):
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster
        from fastsd.serving import ports
        from fastsd.serving.ray import build_app
        os.environ.update(RAY_ENV, RAY_TMPDIR=str(tmp_root))
        self.before = descendants()
        self.port = ports.free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.worker = self.cluster.add_node(num_cpus=1)
        ray.init(address=self.cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(args), name="fastsd", route_prefix="/")
        self.handle = serve.get_deployment_handle("FastSDEngine", app_name="fastsd")

    def replicas(self, tries: int = 40) -> dict:
        """node id -> whoami of the engine replicas the handle reaches (until 2 nodes or `tries` calls)."""
        seen = {}
        for _ in range(tries):
            w = self.handle.whoami.remote().result(timeout_s=60)
            seen[w["node_id"]] = w
            if len(seen) >= 2:
                break
        return seen

    def running(self) -> int:
        from ray import serve
        dep = serve.status().applications["fastsd"].deployments["FastSDEngine"]
        return sum(v for k, v in dep.replica_states.items() if str(getattr(k, "value", k)) == "RUNNING")

    def shutdown(self) -> set[int]:
        """Everything stopped; the processes of this cluster still alive after 30 s (none, we hope)."""
        import ray
        from ray import serve
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()
        end = time.monotonic() + 30
        while (left := descendants() - self.before) and time.monotonic() < end:
            time.sleep(0.5)
        return left


@pytest.fixture(scope="session")
def short_tmp():
    """RAY_TMPDIR: short, so Ray's socket paths stay under 107 characters."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="r", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
