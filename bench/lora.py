"""LoRA benchmark: what fusing and switching adapters costs, side by side in one run.

    python -m fastsd.bench.lora --model sd-1.5 --random-weights --rank 64 --resolution 512
    python -m fastsd.bench.lora --model tiny --steps-timed 3           # a quick check of the script itself

1. Load + first fuse: reading a rank-R LoRA file (UNet attention and text-encoder attention, random
   weights, fastsd.lora_files) and fusing it into the weights.
2. Switch: A -> B -> A ... with both files already read (what a server with a warm adapter cache pays),
   and A -> none.
3. One UNet step (guidance batch 2) with no LoRA and with A fused, interleaved (none, A, none, A, ...) so
   a machine whose load drifts disturbs both alike; fused weights cost nothing per step, so the ratio must
   be 1 within noise.
4. Serving (the in-process batcher, `fastsd.serving.batcher`, on --serving-model, default fastsd-shapes):
   requests/s when consecutive requests alternate between two adapters versus all asking for one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fastsd import load_model, optimize
from fastsd.lora_files import random_factors, save_diffusers_layout, save_kohya_layout
from fastsd.serving.batcher import BatchingPipeline
from fastsd.serving.loras import LoraCatalog

from .machine import machine_info, versions


def _median_time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_engine(args, folder: Path) -> dict:
    model = load_model(args.model, random_weights=args.random_weights, safety_checker=False)
    size = args.resolution or model.native_size
    a = save_diffusers_layout(random_factors(model, rank=args.rank, seed=1), folder / "a.safetensors")
    b = save_kohya_layout(random_factors(model, rank=args.rank, seed=2), folder / "b.safetensors")
    engine = optimize(model, dtype=args.dtype, safety_checker=False)
    out = {"model": args.model, "dtype": args.dtype, "rank": args.rank, "resolution": size,
           "lora_file_mb": round(a.stat().st_size / 2**20, 1)}
    first = engine.set_loras([(a, 1.0)])
    out["load_and_first_fuse_s"] = round(first.seconds, 3)
    out["read_s"] = round(first.read_seconds, 3)
    out["tensors_fused"] = first.fused
    engine.set_loras([(b, 1.0)])  # reads b once
    switches = []
    for i in range(args.switches):
        switches.append(engine.set_loras([(a if i % 2 == 0 else b, 1.0)]).seconds)
    out["switch_s"] = {"median": round(statistics.median(switches), 3), "min": round(min(switches), 3),
                       "all": [round(s, 3) for s in switches]}
    out["to_none_s"] = round(engine.set_loras([]).seconds, 3)

    lat = size // model.vae_scale_factor
    sample = torch.randn(2, model.unet.config.in_channels, lat, lat)
    text = engine.encode(["a photo", ""])
    t = torch.tensor(500)
    step = lambda: engine.backend.unet(sample, t, text)  # noqa: E731
    step()  # warm-up
    times = {"none": [], "lora": []}
    for _ in range(args.steps_timed):
        engine.set_loras([])
        times["none"] += _median_time(step, 1)
        engine.set_loras([(a, 1.0)])
        times["lora"] += _median_time(step, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    out["unet_step_s"] = {k: round(v, 4) for k, v in med.items()}
    out["unet_step_all_s"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    out["unet_step_ratio_lora_over_none"] = round(med["lora"] / med["none"], 3)
    out["unet_input_shapes"] = {"sample": list(sample.shape), "encoder_hidden_states": list(text.shape)}
    return out


def bench_serving(args, folder: Path) -> dict:
    model = load_model(args.serving_model)
    d = folder / "serving"
    for i, name in enumerate(("one", "two")):
        save_diffusers_layout(random_factors(model, rank=8, seed=10 + i), d / f"{name}.safetensors")
    engine = optimize(model)
    pipe = BatchingPipeline(engine, max_batch=8, window=0.02, loras=LoraCatalog(d))
    results = {}
    try:
        def run(pattern):
            lat, lock = [], threading.Lock()
            todo = iter(range(args.requests))

            def client():
                for i in todo:
                    t0 = time.perf_counter()
                    pipe(prompt=["a red circle"], negative_prompt=[""], num_inference_steps=args.serving_steps,
                         seed=i, lora=pattern[i % len(pattern)])
                    with lock:
                        lat.append(time.perf_counter() - t0)
            ts = [threading.Thread(target=client) for _ in range(args.clients)]
            t0 = time.perf_counter()
            [t.start() for t in ts]
            [t.join() for t in ts]
            return args.requests / (time.perf_counter() - t0), statistics.median(lat)
        run(["one"])  # warm-up
        for tag, pattern in (("one_adapter", ["one"]), ("alternating_two", ["one", "two"]),
                             ("one_adapter_again", ["one"])):
            s0 = pipe.stats.lora_switches
            rps, p50 = run(pattern)
            results[tag] = {"requests_per_s": round(rps, 2), "p50_s": round(p50, 3),
                            "switches": pipe.stats.lora_switches - s0}
    finally:
        pipe.close()
    one = (results["one_adapter"]["requests_per_s"] + results["one_adapter_again"]["requests_per_s"]) / 2
    results["ratio_alternating_over_one"] = round(results["alternating_two"]["requests_per_s"] / one, 3)
    results.update(model=args.serving_model, steps=args.serving_steps, clients=args.clients,
                   requests=args.requests, max_batch=8, window_ms=20)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--steps-timed", type=int, default=3, help="UNet steps timed per side (none, LoRA)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--serving-model", default="fastsd-shapes")
    ap.add_argument("--serving-steps", type=int, default=10)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-serving", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"command": "python -m fastsd.bench.lora " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(torch.device("cpu")), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="fastsd-lora-bench-") as tmp:
        report["engine"] = bench_engine(args, Path(tmp))
        if not args.no_serving:
            report["serving"] = bench_serving(args, Path(tmp))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
