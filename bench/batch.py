"""Batch benchmark: `fastsd batch` on one CSV, through the local engine and through a deployment, side by
side in one run; images/s as the command itself reports it (model loading excluded on both sides).

    python -m fastsd.bench.batch                                   # fastsd-shapes, 48 rows, 25 steps
    python -m fastsd.bench.batch --rows 16 --steps 4 --threads 1   # a quick look

Configurations, all with the same torch threads per engine (--threads):
- local, 1 row per engine call (how the Azure ML batch endpoint scores: one prompt at a time)
- local, --batch-size rows per engine call
- a deployment of one replica (--max-batch = --batch-size), rows sent concurrently (`--deployment`), so the
  replica's dynamic batching fills its batches
Every run writes the same images (per-row seeds); the outputs are compared to the local run's pixels.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..serving.deploy import serve, stop
from ..serving.ports import free_port_block
from .serving import hardware

COLOURS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]
RATE = re.compile(r"\((\d+) new in ([\d.]+) s")


def run_batch(argv: list[str], env: dict) -> float:
    fastsd = Path(sys.executable).with_name("fastsd")  # the command as a user runs it (the venv's script)
    proc = subprocess.run([str(fastsd), "batch", *argv, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"fastsd batch {' '.join(argv)} failed:\n{proc.stderr}")
    made, seconds = RATE.search(proc.stderr).groups()
    return int(made) / float(seconds)


def max_diff(a: Path, b: Path) -> int:
    worst = 0
    for png in sorted(a.glob("*.png")):
        x = np.asarray(Image.open(png), np.int16)
        y = np.asarray(Image.open(b / png.name), np.int16)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fastsd-shapes")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine (default 1)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fastsd-bench-batch-"))
    src = work / "prompts.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        for i in range(args.rows):
            w.writerow([f"a {COLOURS[i % 8]} {SHAPES[i % 3]} on a {COLOURS[(i + 3) % 8]} background"])
    os.environ["MII_CACHE_PATH"] = str(work / "mii")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    common = ["--steps", str(args.steps), "--seed", "0"]
    local = ["--model", args.model, *common]
    results = {}
    results["local, 1 row per call"] = run_batch([str(src), "--out", str(work / "local1"), "--batch-size", "1",
                                                  *local], env)
    results[f"local, {args.batch_size} rows per call"] = run_batch(
        [str(src), "--out", str(work / "local"), "--batch-size", str(args.batch_size), *local], env)
    name = f"bench-batch-{os.getpid()}"
    serve(name=name, model=args.model, port=free_port_block(2), threads=args.threads, max_batch=args.batch_size,
          engine={"dtype": "fp32"}, echo=lambda *a: None)
    try:
        results[f"deployment, 1 replica, max batch {args.batch_size}, {args.batch_size} in flight"] = run_batch(
            [str(src), "--out", str(work / "deployment"), "--deployment", name, *common], env)
    finally:
        stop(name, quiet=True)
    diffs = {"local 1 vs local batched": max_diff(work / "local1", work / "local"),
             "deployment vs local batched": max_diff(work / "deployment", work / "local")}

    hw = hardware()
    base = results["local, 1 row per call"]
    print(f"fastsd batch throughput: {args.model}, {args.rows} rows, {args.steps} steps, native size, "
          f"{args.threads} torch thread(s) per engine; {hw}")
    for k, v in results.items():
        print(f"  {k:<58} {v:6.2f} images/s  {v / base:5.2f}x")
    for k, v in diffs.items():
        print(f"  max pixel difference, {k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images_per_s": results, "max_diff": diffs, "hardware": hw,
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
