"""Score fastsd-shapes on its held-out prompts with the pixel judge: diffusers' StableDiffusionPipeline
(FP32), or fastsd configurations side by side.

    python training/eval_shapes.py --model fastsd/models/fastsd-shapes [--steps 25] [--grid out/grid.png]
    python training/eval_shapes.py --configs diffusers,torch-fp32,torch-bf16,torch-fp16,math,triton,onnxruntime

Prompt i is generated with seed i (a torch.Generator), guidance 7.5, at 64x64. A config is
BACKEND-DTYPE (torch-bf16, onnxruntime-fp32) or an attention backend name (torch, fp32, that backend).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastsd.judge import judge  # noqa: E402


def generate(pipe, prompts, seeds, steps=25, guidance=7.5, batch=20):
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, height=64, width=64).images
    return images


CONFIGS = {"torch-fp32": {}, "torch-bf16": {"dtype": "bf16"}, "torch-fp16": {"dtype": "fp16"},
           "sdpa": {"attention": "sdpa"}, "math": {"attention": "math"}, "triton": {"attention": "triton"},
           "torch-bf16-cache3": {"dtype": "bf16", "cache_interval": 3},  # profile fastest on CPUs with bf16
           "onnxruntime": {"backend": "onnxruntime"}, "onnxruntime-fp16": {"backend": "onnxruntime", "dtype": "fp16"}}


def fastsd_generate(model_dir, config: str, prompts, seeds, steps=25, guidance=7.5, batch=20, onnx_dir=None):
    """The same prompts and seeds through a fastsd engine configured as `config` (a key of CONFIGS).
    onnxruntime configs run `onnx_dir`, an export of the model (fp32, or fp16 for onnxruntime-fp16)."""
    from fastsd import load_model, optimize
    flags = dict(CONFIGS[config])
    if flags.get("backend") == "onnxruntime":
        from fastsd.export import load_onnx_model
        model = load_onnx_model(onnx_dir)
    else:
        model = load_model(str(model_dir))
    engine = optimize(model, **flags)
    images = []
    for i in range(0, len(prompts), batch):
        images += engine.generate(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                                  seed=seeds[i:i + batch], height=64, width=64, progress=False).images
    return images


def score(images, prompts) -> dict:
    vs = [judge(im, p) for im, p in zip(images, prompts)]
    pos = [v.ok_position for v in vs if v.ok_position is not None]
    return {"n": len(vs), "shape_colour": float(np.mean([v.ok_shape_colour for v in vs])),
            "background": float(np.mean([v.ok_background for v in vs])),
            "position": float(np.mean(pos)) if pos else None,
            "shape": float(np.mean([v.found_shape == v.asked.shape for v in vs])), "verdicts": vs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fastsd/models/fastsd-shapes")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--n", type=int, default=0, help="first n prompts only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=Path, help="save the images as one PNG grid, 10 a row")
    ap.add_argument("--configs", help="comma list: diffusers and/or fastsd configs " + ", ".join(CONFIGS))
    args = ap.parse_args(argv)
    if args.configs:
        return compare(args)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model)  # FP32 weights, FP32 run
    pipe.set_progress_bar_config(disable=True)
    prompts = json.loads((Path(args.model) / "eval_prompts.json").read_text())
    prompts = prompts[: args.n] if args.n else prompts
    images = generate(pipe, prompts, list(range(len(prompts))), args.steps, args.guidance)
    res = score(images, prompts)
    for i, (p, v) in enumerate(zip(prompts, res.pop("verdicts"))):
        if not v.ok:
            print(f"  miss seed {i}: {p!r} -> shape {v.found_colour} {v.found_shape}, background {v.found_background}")
    print(json.dumps(res))
    if args.grid:
        from PIL import Image
        rows = [np.concatenate([np.asarray(im) for im in images[i:i + 10]], 1)
                for i in range(0, len(images) - len(images) % 10, 10)]
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)
    return res


def compare(args):
    """One table: each config's judge scores on the same prompts and seeds (TRITON_INTERPRET=1 for triton)."""
    import tempfile
    import time
    torch.set_num_threads(args.threads)
    prompts = json.loads((Path(args.model) / "eval_prompts.json").read_text())
    prompts = prompts[: args.n] if args.n else prompts
    seeds = list(range(len(prompts)))
    configs = args.configs.split(",")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dirs = {}
        for c in configs:
            if c.startswith("onnxruntime"):
                from fastsd import load_model
                from fastsd.export import ExportOptions, export_model
                dtype = "fp16" if c.endswith("fp16") else "fp32"
                onnx_dirs[c] = Path(tmp) / dtype
                if not onnx_dirs[c].exists():
                    export_model(load_model(args.model), onnx_dirs[c], ExportOptions(dtype=dtype),
                                 progress=False, echo=None)
        for c in configs:
            t = time.perf_counter()
            if c == "diffusers":
                from diffusers import StableDiffusionPipeline
                pipe = StableDiffusionPipeline.from_pretrained(args.model)
                pipe.set_progress_bar_config(disable=True)
                images = generate(pipe, prompts, seeds, args.steps, args.guidance)
            else:
                images = fastsd_generate(args.model, c, prompts, seeds, args.steps, args.guidance,
                                         onnx_dir=onnx_dirs.get(c))
            res = score(images, prompts)
            res.pop("verdicts")
            rows[c] = dict(res, seconds=time.perf_counter() - t)
    print(f"{len(prompts)} held-out prompts, seed i for prompt i, {args.steps} steps, guidance {args.guidance}")
    print(f"{'config':<18} {'shape colour':>12} {'background':>10} {'shape':>6} {'position':>8} {'s':>6}")
    for c, r in rows.items():
        print(f"{c:<18} {r['shape_colour']:>12.1%} {r['background']:>10.1%} {r['shape']:>6.1%} "
              f"{r['position'] if r['position'] is None else format(r['position'], '.1%'):>8} {r['seconds']:>6.1f}")
    return rows


if __name__ == "__main__":
    main()
