"""Time per image of the SD 2 family's other tasks: depth-to-image and the x4 upscaler, the diffusers pipeline
(StableDiffusionDepth2ImgPipeline / StableDiffusionUpscalePipeline, FP32: the baseline and parity reference)
beside fastsd's engine, on the same inputs and seeds (verify's own: a red disc on blue, a radial depth map).

    python -m fastsd.bench.kinds --model sd-2-depth --random-weights --input 512 --steps 50
    python -m fastsd.bench.kinds --model sd-x4-upscaler --random-weights --input 128 --steps 50
    python -m fastsd.bench.kinds --model sd-x4-upscaler --random-weights --input 512 --steps 50 --no-baseline
    python -m fastsd.bench.kinds --model tiny-upscaler --input 16 --steps 2     # a quick check of the script

A row: the model and its task, input -> output size, the configuration, seconds per image end to end
(median of --repeat runs after one warm-up), the median UNet step and VAE decode, the speed-up over the
baseline and the PSNR of the image against it. The upscaler above 128x128 input runs its UNet in tiles
(fastsd.upscale_tiles) and the VAE decode tiled (--vae-tiling auto), which the untiled diffusers pipeline
does not: there the PSNR measures the tiling, and --no-baseline skips the baseline (untiled, one UNet call per
step over all of the latents: at 512x512 input that was not run on the 2-core machine).
--markdown FILE appends the rows, headed by the command, to FILE (bench/RESULTS.md)."""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fastsd import load_model, optimize
from fastsd.errors import FastSDError, InvalidParameter
from fastsd.reference import psnr, to_uint8
from fastsd.verify_kinds import run_reference, sample_depth_map, sample_image

from .machine import machine_info, versions


def inputs_for(model, side: int) -> dict:
    if model.kind == "upscale":
        return {"image": sample_image((side, side))}
    if model.kind == "depth":
        return {"image": sample_image((side, side)), "depth_map": sample_depth_map((side, side))}
    raise InvalidParameter("model", model.name, "a depth-to-image model or an x4 upscaler")


def peak_rss_gb() -> float:
    """The process's peak resident set so far (Linux ru_maxrss is in KiB), baseline and engine together."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _median(xs):
    return statistics.median(xs) if xs else None


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, random_weights=args.random_weights, safety_checker=False)
    inputs = inputs_for(model, args.input)
    kw = {"noise_level": args.noise_level} if model.kind == "upscale" else {"strength": args.strength}
    out = {"model": args.model, "kind": model.kind, "input": args.input, "steps": args.steps,
           "parameters": {k: int(v) for k, v in model.parameter_counts().items()},
           "machine": machine_info(torch.device(args.device)), "versions": versions(), "rows": []}
    ref_images = None
    if args.baseline:
        times = []
        for i in range(args.repeat + args.warmup):
            ref_images, _, secs = run_reference(  # on the model's own modules: diffusers changes no weight
                model, [args.prompt], [""], steps=args.steps, guidance=args.guidance, seeds=[0],
                scheduler=None, image=inputs["image"], depth_map=inputs.get("depth_map"),
                **({"noise_level": args.noise_level} if model.kind == "upscale" else {"strength": args.strength}))
            if i >= args.warmup:  # the first --warmup runs warm up
                times.append(secs)
        w, h = ref_images[0].size
        out["rows"].append({"config": "diffusers fp32 (baseline)", "output": f"{w}x{h}", "s_per_image": _median(times),
                            "unet_step_ms": None, "vae_decode_s": None, "speedup": 1.0, "psnr_db": None})
    dtypes = args.dtype.split(",")
    for j, dtype in enumerate(dtypes):
        # the last configuration takes the model itself: no second copy of the weights in the peak RSS
        engine = optimize(model if j == len(dtypes) - 1 else copy.deepcopy(model), dtype=dtype, device=args.device,
                          safety_checker=False, vae_tiling=args.vae_tiling)
        totals, steps_ms, vae = [], [], []
        result = None
        for i in range(args.repeat + args.warmup):
            result = engine.generate(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                     seed=0, progress=False, tile_size=args.tile_size if model.kind == "upscale"
                                     else None, **inputs, **kw)
            if i >= args.warmup:
                t = result.timings
                totals.append(t["total"])
                steps_ms.append(1000 * t["unet_step"])
                vae.append(t["vae_decode"])
        w, h = result.images[0].size
        base = out["rows"][0]["s_per_image"] if args.baseline else None
        p = psnr(to_uint8(ref_images)[0], to_uint8(result.images)[0]) if ref_images is not None else None
        out["rows"].append({"config": f"fastsd torch {dtype}", "output": f"{w}x{h}", "s_per_image": _median(totals),
                            "unet_step_ms": _median(steps_ms), "vae_decode_s": _median(vae),
                            "speedup": base / _median(totals) if base else None,
                            "psnr_db": None if p is None or p == float("inf") else p, "identical": p == float("inf"),
                            "applied": engine.describe()["applied"]})
    return out


def format_rows(report: dict) -> str:
    lines = [f"| model | task | input -> output | steps | config | s / image | UNet step ms | VAE decode s | "
             f"speed-up | PSNR dB vs baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        psnr_text = "inf (identical)" if r.get("identical") else "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        lines.append(
            f"| {report['model']} | {report['kind']} | {report['input']}x{report['input']} -> {r['output']} | "
            f"{report['steps']} | {r['config']} | {r['s_per_image']:.2f} | "
            + (f"{r['unet_step_ms']:.1f}" if r["unet_step_ms"] is not None else "-") + " | "
            + (f"{r['vae_decode_s']:.2f}" if r["vae_decode_s"] is not None else "-") + " | "
            + (f"{r['speedup']:.2f}x" if r["speedup"] else "-") + f" | {psnr_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.kinds", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-upscaler", help="a depth or x4 upscaler preset, folder or export")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--input", type=int, default=None,
                   help="side of the input image in pixels (default: the model's size; the upscaler's a quarter)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--strength", type=float, default=0.8, help="depth-to-image (default 0.8)")
    p.add_argument("--noise-level", type=int, default=20, help="x4 upscaler (default 20)")
    p.add_argument("--tile-size", type=int, default=None, help="x4 upscaler UNet windows (default 128)")
    p.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--dtype", default="fp32", help="comma list of fastsd dtypes (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up (default 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs first (default 1; 0 times the first run, cold, for runs too long to repeat)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the diffusers pipeline (it runs the upscaler untiled: 512x512 latents in one UNet call)")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--markdown", help="append the rows, headed by the command, to this file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error(f"--repeat must be at least 1 and --warmup at least 0 (got --repeat {args.repeat}, "
                f"--warmup {args.warmup})")
    if args.input is None:
        probe = load_model(args.model, random_weights=args.random_weights, safety_checker=False)
        args.input = max(probe.native_size, 64) // (4 if probe.kind == "upscale" else 1)
        del probe
    t0 = time.perf_counter()
    try:
        report = bench(args)
    except FastSDError as e:
        print(f"fastsd bench kinds: error: {e}", file=sys.stderr)
        return 2
    report["wall_s"] = time.perf_counter() - t0
    report["peak_rss_gb"] = peak_rss_gb()
    report["command"] = "python -m fastsd.bench.kinds " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    table = format_rows(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        m = report["machine"]
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "a") as f:
            f.write(f"\n`{report['command']}` ({when}, {report['wall_s'] / 60:.1f} min wall, "
                    f"peak RSS {report['peak_rss_gb']:.1f} GiB; "
                    f"{m.get('gpu') or m.get('cpu', '')}, {m.get('torch_threads', '')} torch threads, load "
                    f"{(m.get('load_average') or [float('nan')])[0]:.1f}):\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
