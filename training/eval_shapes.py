"""Score fastsd-shapes on its held-out prompts with diffusers' StableDiffusionPipeline and the pixel judge.

    python training/eval_shapes.py --model fastsd/models/fastsd-shapes [--steps 25] [--grid out/grid.png]

Prompt i is generated with seed i (a torch.Generator), FP32, guidance 7.5, at 64x64.
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
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
