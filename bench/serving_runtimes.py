"""The two serving runtimes side by side, at the same load in the same run: the MII deployment (its REST
gateway) and the Ray Serve application (its proxy and ingress), each with 1 and 2 engine replicas, the same
clients (bench/serving.py's `load`: client threads sending requests back to back, distinct prompts and seeds)
posting the same `POST /score` bodies over HTTP on loopback.

    python -m fastsd.bench.serving_runtimes --model fastsd-shapes --steps 10 --requests 16 --concurrency 4

The Ray side is a one-machine Ray cluster started by this run (num_cpus = the machine's cores, each engine
replica one CPU, the ingress none). Both runtimes get the same engine settings, images per engine call
(--max-batch) and torch threads per replica. The machine's load average is printed with the table: on a shared
machine the figures move with what else runs.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

from fastsd.serving.deploy import serve, stop
from fastsd.serving.errors import DeploymentError
from fastsd.serving.folders import use_cache_path
from fastsd.serving.ports import free_port_block

from .serving import hardware, load


class ScoreClient:
    """DeploymentClient.generate's signature over HTTP `POST /score` (one request per call)."""

    def __init__(self, url: str, timeout: float = 600):
        self.url, self.timeout = url.rstrip("/") + "/score", timeout

    def generate(self, prompts, negatives=None, **kwargs):
        body = json.dumps({"input_data": {"columns": ["prompt"], "data": list(prompts), "index": list(range(len(prompts))),
                                          "parameters": kwargs}}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                rows = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise DeploymentError(str(e.code), e.read()[:200].decode(errors="replace")) from None
        return [base64.b64decode(row["generated_image"]) for row in rows]


def wait_ready(url: str, seconds: float = 900) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}/ready: not ready within {seconds:g} s")


def run_levels(url: str, levels, args, kwargs, tag) -> list[dict]:
    client = ScoreClient(url)
    if args.warmup:
        load(client, 1, args.warmup, kwargs, "warm-up")
    return [load(client, c, args.requests, kwargs, tag) for c in levels]


def mii(replicas: int, levels, args, kwargs) -> tuple[float, list]:
    name = f"rt-{os.getpid()}-{replicas}"
    port, rest = free_port_block(replicas + 1), free_port_block(1)
    t = time.perf_counter()
    serve(name=name, model=args.model, replicas=replicas, port=port, rest_port=rest, max_batch=args.max_batch,
          threads=args.threads, engine={"dtype": "fp32"}, echo=lambda *_: None, max_queue=max(levels) * 4)
    url = f"http://127.0.0.1:{rest}"
    try:
        wait_ready(url)
        up = time.perf_counter() - t
        return up, run_levels(url, levels, args, kwargs, f"mii{replicas}")
    finally:
        stop(name, quiet=True)


def ray(replicas: int, levels, args, kwargs) -> tuple[float, list]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray as ray_
    from ray import serve as rserve
    from fastsd.serving.ray import build_app  # lazy: ray, only for the Ray runtime
    port = free_port_block(1)
    t = time.perf_counter()
    ray_.init(num_cpus=max(replicas, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        rserve.start(http_options={"host": "127.0.0.1", "port": port})
        rserve.run(build_app({"model": args.model, "num_replicas": replicas, "max_batch": args.max_batch,
                              "threads": args.threads, "max_queued_requests": max(levels) * 4}),
                   name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        up = time.perf_counter() - t
        return up, run_levels(url, levels, args, kwargs, f"ray{replicas}")
    finally:
        rserve.shutdown()
        ray_.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.serving_runtimes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastsd-shapes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", default="4", help="client counts (default 4)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--replicas", default="1,2", help="engine replica counts (default 1,2)")
    p.add_argument("--runtimes", default="mii,ray")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="images per engine call, both runtimes (default 4)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    use_cache_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(r) for r in args.replicas.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    if set(runtimes) - {"mii", "ray"}:
        p.error(f"--runtimes: got {args.runtimes!r}; allowed: mii, ray")
    kwargs = {"num_inference_steps": args.steps, "scheduler": "euler"}
    hw = hardware()
    import ray as ray_
    hw["ray"] = ray_.__version__
    print("fastsd serving runtimes: MII (REST gateway) and Ray Serve (proxy + ingress), POST /score over loopback")
    print("  " + ", ".join(f"{k} {v}" for k, v in hw.items()))
    print(f"  model {args.model}, steps {args.steps}, max batch {args.max_batch}, threads per replica {args.threads}, "
          f"requests per level {args.requests}")
    rows = []
    for n in counts:
        for rt in runtimes:
            up, results = (mii if rt == "mii" else ray)(n, levels, args, kwargs)
            for r in results:
                r.update(runtime=rt, replicas=n, startup_s=up, load_avg=os.getloadavg())
                rows.append(r)
                print(f"  {rt} x{n}, {r['concurrency']} clients: {r['rps']:.3g} req/s, mean {r['mean_ms'] / 1e3:.3g} s, "
                      f"p99 {r['p99_ms'] / 1e3:.3g} s, errors {r['errors']}, up in {up:.0f} s, "
                      f"load avg {r['load_avg'][0]:.1f}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"hardware": hw, "args": vars(args), "rows": rows}, f, indent=1)
    print()
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """One row per (runtime, replicas, clients); x MII: requests/s over MII's with as many replicas and clients."""
    mii = {(r["replicas"], r["concurrency"]): r["rps"] for r in rows if r["runtime"] == "mii"}
    lines = ["| runtime | replicas | clients | req/s | x MII | mean latency s | p99 latency s | errors | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = mii.get((r["replicas"], r["concurrency"]))
        ratio = f"{r['rps'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['runtime']} | {r['replicas']} | {r['concurrency']} | {r['rps']:.3g} | {ratio} | "
                     f"{r['mean_ms'] / 1e3:.3g} | {r['p99_ms'] / 1e3:.3g} | {r['errors']} | {r['load_avg'][0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
