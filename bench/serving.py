"""Serving benchmark: requests/s, mean/p50/p99 latency and the deployment's peak memory through a
DeepSpeed-MII deployment at several client concurrencies, for dynamic batching on (a forced
`--max-batch N`), off (`--max-batch 1`) and auto (`--max-batch auto`, measured by the replica), and the
cost of the MII hop (client -> load balancer -> replica) over a direct engine call, side by side in one run.

    python -m fastsd.bench.serving --model fastsd-shapes --steps 25 --requests 24
    python -m fastsd.bench.serving --model sd-1.4 --random-weights --dtype bf16 --height 512 --width 512 \
        --steps 2 --concurrency 4 --requests 4 --threads 2 --warmup 1 --direct-runs 0

Each configuration is a real deployment on loopback (`fastsd.serving.deploy.serve`), started and
stopped by this run; the clients are threads of this process sharing one `DeploymentClient` (the client
every front door uses: MII's stub, one handle and event loop per thread) and sending requests back to
back with distinct prompts and seeds.
Memory is the sum of the proportional set sizes (Pss, so shared libraries count once) of every
process of the deployment, sampled every 0.25 s; its peak while serving and during start-up (which
holds auto's measurement) are reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

from fastsd import load_model, optimize
from fastsd.presets import PRESETS
from fastsd.serving.client import DeploymentClient
from fastsd.serving.deploy import serve, stop
from fastsd.serving.folders import cache_path, read_json, use_cache_path
from fastsd.serving.ports import free_port_block
from fastsd.serving.status import status


def percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def hardware() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    import mii
    import torch

    import deepspeed
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "deepspeed-mii": str(mii.__version__).strip(),
            "grpcio": grpc.__version__, "cuda": torch.cuda.is_available()}


def load(name, concurrency: int, requests: int, kwargs: dict, tag: str) -> dict:
    """`requests` requests from `concurrency` client threads; latency of each, wall time of all. `name`: a
    deployment's name (its DeploymentClient), or any client with DeploymentClient.generate's signature
    (bench/serving_runtimes.py's HTTP client of /score, for MII's REST gateway and Ray Serve alike)."""
    deployment = DeploymentClient(name) if isinstance(name, str) else name
    latencies, errors = [], []
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(concurrency + 1)

    def client():
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                deployment.generate([f"{tag} request {i}"], [""], seed=i, **kwargs)
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e)[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    [t.start() for t in threads]
    start.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "rps": len(latencies) / wall, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else 0,
            "wall_s": wall}


class MemorySampler:
    """Peak of the summed Pss (Rss where smaps_rollup is missing) of a deployment's processes."""

    def __init__(self, ddir, interval: float = 0.25):
        self.ddir, self.interval = ddir, interval
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self):
        state = read_json(self.ddir / "state.json") or {}
        return [state.get("supervisor_pid")] + [c.get("pid") for c in state.get("children", {}).values()]

    @staticmethod
    def _bytes(pid) -> int:
        for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith(key):
                            return int(line.split()[1]) * 1024
            except OSError:
                continue
        return 0

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, sum(self._bytes(p) for p in self._pids() if p))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def hop_overhead(engine, name: str, kwargs: dict, gen: dict, runs: int) -> dict:
    """Pairs of (direct engine call, the same request through the deployment), interleaved so that
    both see the same machine load; the replica is idle during the direct call."""
    client = DeploymentClient(name)
    direct, served = [], []
    for i in range(runs):
        t = time.perf_counter()
        engine.generate([f"hop {i}"], [""], seed=i, **gen)
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.generate([f"hop {i}"], [""], seed=i, **kwargs)
        served.append(time.perf_counter() - t)
    added = [(s - d) * 1e3 for s, d in zip(served, direct)]
    return {"direct_ms": statistics.median(direct) * 1e3, "mii_ms": statistics.median(served) * 1e3,
            "added_ms": statistics.median(added), "added_p90_ms": percentile(added, 90), "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", default="fp32", help="engine dtype of the replicas (default fp32)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--concurrency", default="1,4,8", help="client counts (default 1,4,8)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="requests before the timed ones, per deployment")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica and for the direct call")
    p.add_argument("--configs", default="on,off,auto", help="which of on, off, auto to run (default all)")
    p.add_argument("--max-batch", type=int, default=8, help="batching on: images per engine call (default 8)")
    p.add_argument("--max-batch-limit", type=int, default=8, help="auto: largest batch tried (default 8)")
    p.add_argument("--batch-probe-steps", type=int, help="auto: steps of the start-up measurement "
                   "(default --steps, so the measured bucket is the one served)")
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--direct-runs", type=int, default=20,
                   help="(direct, served) pairs for the hop overhead; 0 skips it and the direct engine")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import signal
    # `timeout` ends a run with SIGTERM: as SystemExit, the deployment being measured is stopped (finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or set(configs) - {"on", "off", "auto"}:
        p.error(f"--configs: got {args.configs!r}; allowed: a list of on, off, auto")

    import torch

    torch.set_num_threads(args.threads)
    use_cache_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    hw = hardware()
    print("fastsd serving benchmark")
    print("  " + ", ".join(f"{k} {v}" for k, v in hw.items()))

    native = PRESETS[args.model].size if args.model in PRESETS else None
    shape = {"model": args.model + (" (random weights)" if args.random_weights else ""), "dtype": args.dtype,
             "size": f"{kwargs.get('width', native)}x{kwargs.get('height', native)}",
             "steps": args.steps, "guidance": args.guidance, "images_per_request": 1, "replicas": args.replicas,
             "threads_per_replica": args.threads, "batching_on": args.max_batch, "auto_limit": args.max_batch_limit,
             "batch_window_ms": args.batch_window_ms, "warmup_requests": args.warmup}
    print("  " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    hop = None
    engine = None
    if args.direct_runs:  # the direct engine call: the same model, settings and thread count as one replica
        engine = optimize(load_model(args.model, random_weights=args.random_weights), dtype=args.dtype)
    gen = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": kwargs.get("height"),
           "width": kwargs.get("width"), "progress": False}
    if engine is not None:
        engine.generate(["warm up"], [""], seed=0, **gen)
    sizes = {"on": args.max_batch, "off": 1, "auto": "auto"}
    results = {}
    for label in configs:
        max_batch = sizes[label]
        name = f"bench-{os.getpid()}-{label}"
        port = free_port_block(args.replicas + 1)
        t = time.perf_counter()
        with MemorySampler(cache_path() / name) as startup_mem:
            serve(name=name, model=args.model, random_weights=args.random_weights, replicas=args.replicas, port=port,
                  max_batch=max_batch, max_batch_limit=args.max_batch_limit,
                  batch_probe_steps=args.batch_probe_steps or args.steps, batch_window_ms=args.batch_window_ms,
                  threads=args.threads, engine={"dtype": args.dtype}, echo=lambda *_: None,
                  max_queue=max(levels))  # every client waits its turn: this measures batching, not shedding
        started = time.perf_counter() - t
        try:
            if args.warmup:
                load(name, 1, args.warmup, kwargs, "warm-up")
            rows = []
            for c in levels:
                with MemorySampler(cache_path() / name) as mem:
                    rows.append(load(name, c, args.requests if c > 1 else max(4, args.requests // 2), kwargs, label))
                rows[-1]["peak_memory_bytes"] = mem.peak
            if label == "off" and engine is not None:
                hop = hop_overhead(engine, name, kwargs, gen, args.direct_runs)
            buckets = [b for r in status(name)["replicas"] for b in (r.get("batching") or {}).get("buckets", [])]
        finally:
            stop(name, quiet=True)
        results[label] = {"max_batch": max_batch, "startup_s": started, "startup_peak_memory_bytes": startup_mem.peak,
                          "levels": rows, "batch_sizes": buckets}
        chosen = "; ".join(f"{b['bucket']}: {b['chosen']} ({b['reason']}; images/s {b['images_per_s']})"
                           for b in buckets if b["chosen"] is not None)
        print(f"  {label} (--max-batch {max_batch}): deployment up in {started:.1f} s, start-up peak memory "
              f"{startup_mem.peak / 2**30:.2f} GiB" + (f"; chose {chosen}" if label == "auto" else ""))
        for row in rows:  # as each configuration ends, so a run cut short still shows what it measured
            print(f"    {row['concurrency']} clients: {row['rps']:.3g} req/s, mean {row['mean_ms'] / 1e3:.3g} s, "
                  f"p99 {row['p99_ms'] / 1e3:.3g} s, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB, "
                  f"errors {row['errors']}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"hardware": hw, "shape": shape, "mii_hop": hop, "results": results}, f, indent=1)

    print()
    print(table(results, levels))
    if hop:
        print()
        print(f"  the MII hop (client -> load balancer -> replica, batching off) over a direct engine call, "
              f"{args.direct_runs} interleaved pairs: direct median {hop['direct_ms']:.1f} ms, through MII median "
              f"{hop['mii_ms']:.1f} ms, added median {hop['added_ms']:.1f} ms (p90 {hop['added_p90_ms']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw, "shape": shape, "mii_hop": hop, "results": results}, f, indent=1)
    return 0


def table(results: dict, levels: list[int]) -> str:
    """One row per (clients, configuration), as the README shows it; x off: requests/s over batching off."""
    lines = ["| clients | batching | req/s | x off | mean latency s | p99 latency s | peak memory GiB |",
             "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(levels):
        off = results.get("off", {}).get("levels", [None] * len(levels))[i]
        for label, r in results.items():
            row = r["levels"][i]
            name = {"on": f"on (--max-batch {r['max_batch']})", "off": "off (--max-batch 1)"}.get(label, "auto")
            ratio = f"{row['rps'] / off['rps']:.2f}x" if off and off["rps"] else "-"
            lines.append(f"| {c} | {name} | {row['rps']:.3g} | {ratio} | {row['mean_ms'] / 1e3:.3g} | "
                         f"{row['p99_ms'] / 1e3:.3g} | {row['peak_memory_bytes'] / 2**30:.2f} |"
                         + (f" errors {row['errors']}" if row["errors"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
