"""The CPU peer measured alone, in its own process: for a machine where diffusers' FP32 pipeline and the peer
do not fit in memory side by side (`fastsd bench --peer` keeps both loaded).

    python -m fastsd.bench.peer_alone --model sd-1.4 --random-weights --threads 2 --json out/peer.json

Builds the peer as `fastsd bench --peer openvino-genai` does (optimum-intel's export, cached; GenAI's
pipeline, static shapes, its defaults), then times one UNet step with guidance and one VAE decode on seeded
inputs of the bench's shapes (--warmup untimed calls, then --repeat timed: wall and process CPU time) and one
whole generation of --steps with the pipeline's own perf metrics, and reports the peak RSS. No parity here:
that needs the baseline beside it (`fastsd bench --peer`)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from fastsd.errors import InvalidParameter
from fastsd.loading import load_model

from .machine import machine_info, set_threads, versions, write_json
from .measurement import timed_call
from .peer import PeerRunner, export_folder, export_versions, is_exported, peer_python
from .settings import BenchSettings


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_name: str, random_weights: bool, steps: int, repeat: int, warmup: int, python: str) -> dict:
    with torch.device("meta"):  # the export is cached: its key needs the configs, not the weights
        meta = load_model(model_name, random_weights=random_weights, safety_checker=False)
    size = meta.native_size
    f = meta.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    lat = (meta.unet.config.in_channels, size // f, size // f)
    x = {"sample": torch.randn((2, *lat), generator=g), "t": 1,
         "hidden": torch.randn((2, 77, meta.unet.config.cross_attention_dim), generator=g),
         "latents": torch.randn((1, meta.vae.config.latent_channels, *lat[1:]), generator=g)}
    settings = BenchSettings(model=model_name, random_weights=random_weights, steps=steps, safety_checker=False)
    t0 = time.perf_counter()
    cached = is_exported(export_folder(meta, export_versions(python)))  # else the export needs the weights
    runner = PeerRunner((lambda: meta) if cached else
                        (lambda: load_model(model_name, random_weights=random_weights, safety_checker=False)),
                        settings, python, size, size)
    out = {"model": model_name, "size": size, "build_s": time.perf_counter() - t0,
           "resident_after_build_mb": _status_mb("VmRSS")}
    cpu = torch.device("cpu")
    for name, call in (("unet_step", lambda: runner.unet_step(x["sample"], x["t"], x["hidden"])),
                       ("vae_decode", lambda: runner.vae_decode(x["latents"]))):
        for _ in range(warmup):
            call()
        walls, cpus = [], []
        for _ in range(repeat):
            walls.append(timed_call(call, cpu, cpus))
        out[name] = {"wall_s": walls, "cpu_s": cpus, "median_s": statistics.median(walls),
                     "cpu_median_s": statistics.median(cpus)}
    t0 = time.perf_counter()
    runner.end_to_end(settings, 1, size, size)
    out["end_to_end"] = {"steps": steps, "wall_s": time.perf_counter() - t0}
    out["own_metrics"] = runner.own_metrics()
    out["describe"] = runner.describe()
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["machine"], out["versions"], out["load_average_end"] = machine_info(cpu), versions(), os.getloadavg()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.bench.peer_alone", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--peer-python", help="the export environment's Python (default as fastsd bench --peer)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        for name in ("steps", "repeat"):
            if getattr(args, name) < 1:
                raise InvalidParameter(name, getattr(args, name), "1 or more")
        set_threads(args.threads)
        info = measure(args.model, args.random_weights, args.steps, args.repeat, args.warmup,
                       peer_python(args.peer_python))
    except InvalidParameter as e:
        print(f"python -m fastsd.bench.peer_alone: error: {e}", file=sys.stderr)
        return 2
    keys = ("build_s", "resident_after_build_mb", "unet_step", "vae_decode", "end_to_end", "peak_rss_mb")
    print(json.dumps({k: info[k] for k in keys}, indent=1))
    print(f"own metrics: UNet call median {info['own_metrics']['unet_call_median_s']:.3f} s, generate "
          f"{info['own_metrics']['generate_median_s']:.2f} s; load average {info['load_average_end'][0]:.1f}")
    write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
