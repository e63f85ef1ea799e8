"""Serving benchmark: requests/s and p50/p99 latency through a DeepSpeed-MII deployment at several
client concurrencies, dynamic batching on versus off, and the cost of the MII hop (client -> load
balancer -> replica) over a direct engine call, side by side in one run.

    python -m fastsd.bench.serving                     # tiny model, 1/4/8 clients
    python -m fastsd.bench.serving --model small-sd --random-weights --steps 10 --requests 8

Each configuration is a real deployment on loopback (`fastsd.serving.deploy.serve`), started and
stopped by this run; the clients are threads of this process, each with its own MII client (MII's
client binds to one event loop) sending requests back to back with distinct prompts and seeds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time


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


def load(name: str, concurrency: int, requests: int, kwargs: dict, tag: str) -> dict:
    """`requests` requests from `concurrency` client threads; latency of each, wall time of all."""
    import mii
    latencies, errors = [], []
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(concurrency + 1)

    def client():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            run(mii.legacy.mii_query_handle(name))
        finally:
            loop.close()

    def run(c):
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                c.query({"prompt": [f"{tag} request {i}"], "negative_prompt": [""]}, seed=i, **kwargs)
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


def hop_overhead(engine, name: str, kwargs: dict, gen: dict, runs: int) -> dict:
    """Pairs of (direct engine call, the same request through the deployment), interleaved so that
    both see the same machine load; the replica is idle during the direct call."""
    import mii
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    client = mii.legacy.mii_query_handle(name)
    direct, served = [], []
    for i in range(runs):
        t = time.perf_counter()
        engine.generate([f"hop {i}"], [""], seed=i, **gen)
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.query({"prompt": [f"hop {i}"], "negative_prompt": [""]}, seed=i, **kwargs)
        served.append(time.perf_counter() - t)
    loop.close()
    added = [(s - d) * 1e3 for s, d in zip(served, direct)]
    return {"direct_ms": statistics.median(direct) * 1e3, "mii_ms": statistics.median(served) * 1e3,
            "added_ms": statistics.median(added), "added_p90_ms": percentile(added, 90), "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--concurrency", default="1,4,8", help="client counts (default 1,4,8)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica and for the direct call")
    p.add_argument("--max-batch", type=int, default=8, help="batching on: most images per engine call")
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--direct-runs", type=int, default=20, help="(direct, served) pairs for the hop overhead")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from fastsd import load_model, optimize
    from fastsd.serving.common import free_port_block, use_cache_path
    from fastsd.serving.deploy import serve, stop
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

    # the direct engine call: the same model, settings and thread count as one replica
    engine = optimize(load_model(args.model, random_weights=args.random_weights), dtype="fp32")
    shape = {"model": args.model, "size": f"{kwargs.get('width', engine.model.native_size)}x"
                                          f"{kwargs.get('height', engine.model.native_size)}",
             "steps": args.steps, "guidance": args.guidance, "images_per_request": 1, "replicas": args.replicas,
             "threads_per_replica": args.threads, "max_batch": args.max_batch, "batch_window_ms": args.batch_window_ms}
    print("  " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    gen = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": kwargs.get("height"),
           "width": kwargs.get("width"), "progress": False}
    engine.generate(["warm up"], [""], seed=0, **gen)
    results = {}
    for label, max_batch in (("batching on", args.max_batch), ("batching off", 1)):
        name = f"bench-{os.getpid()}-{max_batch}"
        port = free_port_block(args.replicas + 1)
        t = time.perf_counter()
        serve(name=name, model=args.model, random_weights=args.random_weights, replicas=args.replicas, port=port,
              max_batch=max_batch, batch_window_ms=args.batch_window_ms, threads=args.threads,
              engine={"dtype": "fp32"}, echo=lambda *_: None)
        started = time.perf_counter() - t
        try:
            load(name, 1, 2, kwargs, "warm-up")
            rows = [load(name, c, args.requests if c > 1 else max(8, args.requests // 2), kwargs, label)
                    for c in levels]
            if max_batch == 1:
                hop = hop_overhead(engine, name, kwargs, gen, args.direct_runs)
        finally:
            stop(name, quiet=True)
        results[label] = {"startup_s": started, "levels": rows}
        print(f"  {label}: deployment up in {started:.1f} s")

    on, off = results["batching on"]["levels"], results["batching off"]["levels"]
    print()
    print(f"  {'clients':>7} | {'on req/s':>8} {'p50 ms':>8} {'p99 ms':>8} | {'off req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} | {'on/off':>6}")
    for a, b in zip(on, off):
        print(f"  {a['concurrency']:>7} | {a['rps']:>8.2f} {a['p50_ms']:>8.0f} {a['p99_ms']:>8.0f} | {b['rps']:>9.2f} "
              f"{b['p50_ms']:>8.0f} {b['p99_ms']:>8.0f} | {a['rps'] / b['rps']:>6.2f}"
              + (f"  errors on {a['errors']} off {b['errors']}" if a["errors"] or b["errors"] else ""))
    print()
    print(f"  the MII hop (client -> load balancer -> replica, batching off) over a direct engine call, "
          f"{args.direct_runs} interleaved pairs: direct median {hop['direct_ms']:.1f} ms, through MII median "
          f"{hop['mii_ms']:.1f} ms, added median {hop['added_ms']:.1f} ms (p90 {hop['added_p90_ms']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw, "shape": shape, "mii_hop": hop,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
