"""Where a speed profile's UNet step goes, per op: torch.profiler over one UNet call (with guidance) of the
configuration `--profile` picks on this machine, on the bench's inputs.

    python -m fastsd.bench.ops --model sd-1.4 --random-weights --profile fast --threads 2

Prints the top ops by self CPU time (share of the step, calls, input shapes of the heaviest) after
--warmup untimed calls; the profiled step's wall time is beside it. The torch backend only (the profile
resolves to it on CPUs without AMX); for an OpenVINO configuration it says so and exits 2."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fastsd.errors import InvalidParameter
from fastsd.loading import load_model
from fastsd.optimize import OptimizeConfig, optimize
from fastsd.profiles import PROFILE_NAMES, profile_flags

from .inputs import make_inputs
from .machine import machine_info, set_threads, versions, write_json
from .settings import BenchSettings


def profile_step(model_name: str, random_weights: bool, profile: str, resolution: int | None = None,
                 warmup: int = 1, top: int = 15, echo=print) -> dict:
    if profile not in PROFILE_NAMES:
        raise InvalidParameter("profile", profile, ", ".join(PROFILE_NAMES))
    flags = {k: v for k, v in profile_flags(profile, "cpu").items() if k != "device"}
    if flags.get("backend", "torch") != "torch":
        raise InvalidParameter("profile", profile, f"a profile that runs the torch backend here ({profile} runs "
                                                   f"{flags['backend']} on this CPU)")
    model = load_model(model_name, random_weights=random_weights, safety_checker=False)
    size = resolution or model.native_size
    settings = BenchSettings(model=model_name, steps=50)
    x, shapes = make_inputs(model, settings, 1, size, size, torch.device("cpu"))
    engine = optimize(model, OptimizeConfig(device="cpu", **flags))
    unet = engine.backend.unet
    for _ in range(warmup):
        unet(x["sample"], x["t"], x["hidden"])
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        unet(x["sample"], x["t"], x["hidden"])
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages(group_by_input_shape=False) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append({"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                     "calls": e.count})
    info = {"model": model.name, "profile": profile, "flags": flags, "describe": engine.describe(),
            "shapes": shapes["unet_step"], "threads": torch.get_num_threads(), "wall_s": wall,
            "self_cpu_total_ms": total / 1e3, "top": rows, "machine": machine_info(torch.device("cpu")),
            "versions": versions(), "load_average": os.getloadavg()}
    echo(f"{model.name} UNet step, profile {profile} ({flags or 'fp32 defaults'}), {size}x{size}, sample "
         f"{'x'.join(map(str, shapes['unet_step']['sample']))}; {info['threads']} threads; wall {wall:.2f} s under "
         f"the profiler; load average {info['load_average'][0]:.1f}; {info['machine']['cpu']}")
    echo(f"{'op':<40} {'self CPU ms':>12} {'share':>7} {'calls':>6}")
    for r in rows:
        echo(f"{r['op'][:40]:<40} {r['self_cpu_ms']:>12,.0f} {r['share']:>6.1%} {r['calls']:>6}")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.bench.ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--profile", default="fast", help="fast | fastest | exact (default fast)")
    ap.add_argument("--resolution", type=int, help="height and width (default: the model's size)")
    ap.add_argument("--threads", type=int, help="torch threads")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        set_threads(args.threads)
        info = profile_step(args.model, args.random_weights, args.profile, args.resolution, args.warmup, args.top)
    except InvalidParameter as e:
        print(f"python -m fastsd.bench.ops: error: {e}", file=sys.stderr)
        return 2
    write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
