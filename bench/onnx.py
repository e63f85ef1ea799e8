"""ONNX Runtime (CPU) against PyTorch eager, side by side in one run, on the same inputs:
one UNet step (batch 2 = one image with guidance, 77 tokens) and one VAE decode (one image).

    python -m fastsd.bench.onnx                  # sd-1.4 architecture, random weights, 512x512 (heavy:
                                                 # ~3.5 GB export in a temp folder, deleted afterwards)
    python -m fastsd.bench.onnx --preset tiny    # seconds: a smoke test

Each figure is the median of --repeat timed calls after --warmup untimed ones, the two engines called
alternately (so that other load on a shared machine falls on both); the ratio is PyTorch time over
ONNX Runtime time (above 1: ONNX Runtime is faster). Beside each, the max abs / relative difference
of the two outputs (the export's parity)."""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

from fastsd.export.graphs import ModelDims, graph_specs
from fastsd.export.parity import session
from fastsd.loading import load_model
from fastsd.presets import get_preset

from .machine import machine_info, versions, write_json


def _time_pair(fns: dict, repeat: int, warmup: int) -> dict:
    """Time the callables alternately (a, b, a, b, ...), so that load from other processes on a shared
    machine falls on both alike; median and min of `repeat` timed calls each, after `warmup` untimed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v), "all_s": v}
            for k, v in times.items()}


def run(preset: str = "sd-1.4", threads: int | None = None, repeat: int = 3, warmup: int = 1,
        keep: str | None = None, echo=print) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    from fastsd.export import export_model  # here, not at the top: it imports the optional onnx package

    p = get_preset(preset)
    if p is None:
        raise SystemExit(f"bench onnx: unknown preset {preset!r}")
    size = p.size
    model = load_model(preset, random_weights=True, safety_checker=False)
    dims = ModelDims.of(model)
    lat = size // dims.vae_scale_factor
    shapes = {"unet": {"sample": [2, dims.in_channels, lat, lat], "timestep": [1],
                       "encoder_hidden_states": [2, 77, dims.hidden_size]},
              "vae_decoder": {"latent_sample": [1, dims.latent_channels, lat, lat]}}
    machine, ver = machine_info(torch.device("cpu")), versions()
    info = {"preset": preset, "weights": "random (seed 0)", "image": f"{size}x{size}", "threads": threads,
            "machine": machine, "versions": ver, "shapes": shapes, "repeat": repeat, "warmup": warmup,
            "results": {}}
    load = machine.get("load_average")
    echo(f"fastsd bench onnx: {preset} ({info['weights']}), {info['image']}; {machine['cpu']}, "
         f"{machine['usable_cores']} usable cores, {threads} threads"
         + (f", load average {load[0]:.1f}" if load else "") + "; "
         + ", ".join(f"{k} {v}" for k, v in ver.items() if k in ("torch", "onnxruntime", "diffusers", "python")))
    folder = keep or tempfile.mkdtemp(prefix="fastsd-bench-onnx-", dir="/tmp")
    try:
        t0 = time.perf_counter()
        export = export_model(model, folder, components="unet,vae_decoder", overwrite=True,
                              resolution=f"{size}:{size}:{size}", batch="1:1:1", echo=echo)
        info["export_s"] = time.perf_counter() - t0
        info["export_bytes"] = sum(f.stat().st_size for f in __import__("pathlib").Path(folder).rglob("*")
                                   if f.is_file())
        echo(f"export: {info['export_s']:.1f}s (with parity checks), {info['export_bytes'] / 1e9:.2f} GB on disk")
        info["export_parity"] = export["parity"]["results"]
        specs = graph_specs()
        echo(f"{'graph':<12} {'shapes':<60} {'PyTorch eager':>14} {'ORT CPU':>10} {'ratio':>7}  "
             f"{'max abs diff':>12} {'rel':>9}")
        for comp in ("unet", "vae_decoder"):
            spec = specs[comp]
            inputs = spec.sample_inputs(dims, shapes[comp], seed=7)
            module = spec.module(model)
            with torch.inference_mode():
                ref = module(*inputs.values())
            sess = session(f"{folder}/{comp}/model.onnx", threads=threads)
            feed = {k: v.numpy() for k, v in inputs.items()}
            got = sess.run(None, feed)[0]
            diff = float(np.abs(got - ref.numpy()).max())
            rel = diff / float(np.abs(ref.numpy()).max())

            def torch_call():
                with torch.inference_mode():
                    module(*inputs.values())
            timed = _time_pair({"torch": torch_call, "onnxruntime": lambda: sess.run(None, feed)}, repeat, warmup)
            t_torch, t_ort = timed["torch"], timed["onnxruntime"]
            ratio = t_torch["median_s"] / t_ort["median_s"]
            info["results"][comp] = {"torch": t_torch, "onnxruntime": t_ort, "ratio_torch_over_ort": ratio,
                                     "max_abs_diff": diff, "max_rel_diff": rel, "provider": sess.get_providers()[0]}
            shp = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes[comp].items())
            echo(f"{comp:<12} {shp:<60} {t_torch['median_s']:>13.3f}s {t_ort['median_s']:>9.3f}s "
                 f"{ratio:>6.2f}x  {diff:>12.2e} {rel:>9.2e}")
            del sess
        echo("ratio = PyTorch eager time / ONNX Runtime time (median); above 1 means ONNX Runtime is faster")
        load = machine_info(torch.device("cpu")).get("load_average")
        if load:
            echo(f"load average at the end: {load[0]:.1f} on {machine['usable_cores']} usable cores "
                 "(above that count, other processes shared the cores: compare ratios only)")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.bench.onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd-1.4", help="model preset, built with random weights (default sd-1.4; "
                                                       "tiny for a quick smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per figure (median; default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--keep", help="export into this folder and keep it (default: a temp folder, deleted)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    info = run(args.preset, args.threads, args.repeat, args.warmup, args.keep)
    write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
