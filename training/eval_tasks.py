"""Task accuracy of fastsd-shapes on image-to-image and inpainting, through a fastsd engine on one backend,
on prompts never seen in training (each names a held-out (colour, shape, position) of shapes_data).

    python training/eval_tasks.py --task img2img --backend torch --dtype fp32 --prompts 30
    python training/eval_tasks.py --task inpaint --backend openvino --prompts 30

image-to-image: the scene of a held-out prompt is drawn (shapes_data.draw_scene) with the shape in another
colour, then repainted with the prompt at --strength; `fastsd.judge.judge` must find the prompted shape
colour and background. "kept in place" counts images whose shape stayed where the drawn one was.
inpainting: a scene with a shape (of another colour and kind) at the prompt's position; a 32x32 box around
that position is masked, and the prompt asks for its own shape there. `fastsd.judge.judge_region` reads
the masked region only, and the PSNR of the pixels outside the mask against the input
(judge.KEPT_PSNR_DB). --scene empty masks the same box on a plain background instead.
Case i runs with seed i; the scenes are drawn from a fixed seed, so every backend sees the same inputs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))
from fastsd.judge import KEPT_PSNR_DB, PALETTE, POSITIONS, SHAPES, SIZES, Prompt, judge, judge_region, parse_prompt  # noqa: E402
from shapes_data import draw_scene, eval_prompts, held_out_triples  # noqa: E402

MODEL = ROOT / "fastsd" / "models" / "fastsd-shapes"
SIDE = 64
BOX = 32  # the inpainting mask: a BOX x BOX square around the prompt's position, on the 8-pixel latent grid
# The settings the README's table uses (chosen by the sweep described there).
DEFAULTS = {"img2img": {"strength": 0.8, "guidance": 7.5}, "inpaint": {"strength": 0.9, "guidance": 12.0}}


@dataclass
class Case:
    prompt: str
    image: Image.Image
    mask: Image.Image | None = None


def _other(rng: random.Random, *avoid: str) -> str:
    return rng.choice([c for c in PALETTE if c not in avoid])


def img2img_cases(n: int, seed: int = 0) -> list[Case]:
    """Held-out prompts (shapes_data.eval_prompts), each over its own scene with the shape recoloured."""
    rng = random.Random(seed)
    cases = []
    for text in eval_prompts(n):
        p = parse_prompt(text)
        source = Prompt(_other(rng, p.colour, p.background), p.shape, p.size, p.position, p.background)
        cases.append(Case(text, draw_scene(source, rng, SIDE)))
    return cases


def box_mask(position: str, side: int = SIDE, box: int = BOX) -> Image.Image:
    """White (repaint) box x box around a position of judge.POSITIONS, aligned to 8 pixels, inside the image."""
    fx, fy = POSITIONS[position]
    x0 = min(max(0, round((fx * side - box / 2) / 8) * 8), side - box)
    y0 = min(max(0, round((fy * side - box / 2) / 8) * 8), side - box)
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle([x0, y0, x0 + box - 1, y0 + box - 1], fill=255)
    return mask


def inpaint_cases(n: int, seed: int = 0, scene: str = "replace") -> list[Case]:
    """Held-out (colour, shape, position) triples in turn, each with a background and a scene drawn at random."""
    rng = random.Random(seed)
    triples = sorted(held_out_triples())
    rng.shuffle(triples)
    cases = []
    for i in range(n):
        colour, shape, position = triples[i % len(triples)]
        bg = _other(rng, colour)
        size = rng.choice(SIZES) if rng.random() < 0.5 else None
        if scene == "replace":
            there = Prompt(_other(rng, colour, bg), rng.choice([s for s in SHAPES if s != shape]), size, position, bg)
            image = draw_scene(there, rng, SIDE)
        else:
            image = Image.new("RGB", (SIDE, SIDE), PALETTE[bg])
        cases.append(Case(Prompt(colour, shape, size, position, bg).text(), image, box_mask(position)))
    return cases


def make_engine(backend: str, dtype: str, model_dir=MODEL, onnx_dir=None):
    """An engine over fastsd-shapes. onnxruntime runs an ONNX export (written to `onnx_dir`, or a temporary
    folder); openvino converts the PyTorch model itself (once, into its cache)."""
    from fastsd import load_model, optimize
    if backend == "onnxruntime":
        from fastsd.export import export_model, load_onnx_model
        if onnx_dir is None:
            onnx_dir = Path(tempfile.mkdtemp(prefix="fastsd-eval-tasks-")) / "onnx"
        if not (Path(onnx_dir) / "fastsd_export.json").is_file():
            export_model(load_model(str(model_dir)), onnx_dir, progress=False, echo=None)
        return optimize(load_onnx_model(onnx_dir), backend=backend, dtype=dtype, device="cpu")
    return optimize(load_model(str(model_dir)), backend=backend, dtype=dtype, device="cpu")


def run(engine, cases: list[Case], strength: float, steps: int = 25, guidance: float = 7.5,
        batch: int = 10) -> list[Image.Image]:
    """Case i with seed i, `batch` cases per engine call."""
    images = []
    for i in range(0, len(cases), batch):
        part = cases[i:i + batch]
        masks = [c.mask for c in part] if part[0].mask is not None else None
        images += engine.generate([c.prompt for c in part], image=[c.image for c in part], mask_image=masks,
                                  strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                                  seed=list(range(i, i + len(part))), progress=False).images
    return images


def score_img2img(cases: list[Case], images: list[Image.Image]) -> dict:
    vs = [judge(im, c.prompt) for im, c in zip(images, cases)]
    before = [judge(c.image, c.prompt) for c in cases]
    return {"n": len(vs), "ok": float(np.mean([v.ok for v in vs])),
            "shape_colour": float(np.mean([v.ok_shape_colour for v in vs])),
            "background": float(np.mean([bool(v.ok_background) for v in vs])),
            "kept_in_place": float(np.mean([v.found_position == b.found_position for v, b in zip(vs, before)])),
            "inputs_ok": float(np.mean([b.ok for b in before])), "verdicts": vs}


def score_inpaint(cases: list[Case], images: list[Image.Image]) -> dict:
    vs = [judge_region(im, c.prompt, c.mask, c.image) for im, c in zip(images, cases)]
    kept = np.array([v.kept_psnr for v in vs])
    return {"n": len(vs), "ok": float(np.mean([v.ok for v in vs])),
            "region": float(np.mean([v.ok_region for v in vs])),
            "kept": float(np.mean([v.ok_kept for v in vs])),
            "kept_psnr_median": float(np.median(kept)), "kept_psnr_min": float(kept.min()),
            "inputs_ok": float(np.mean([judge_region(c.image, c.prompt, c.mask).ok_region for c in cases])),
            "verdicts": vs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("img2img", "inpaint"), required=True)
    ap.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--prompts", type=int, default=30, help="held-out prompts to score (default 30)")
    ap.add_argument("--strength", type=float, help="default: img2img 0.8, inpaint 0.9")
    ap.add_argument("--guidance", type=float, help="default: img2img 7.5, inpaint 12")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scene", choices=("replace", "empty"), default="replace",
                    help="inpaint: a shape to replace in the masked box (default), or a plain background")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx-dir", type=Path, help="onnxruntime: an export of the model to reuse (written if missing)")
    ap.add_argument("--grid", type=Path, help="save input, mask and output of each case as one PNG")
    ap.add_argument("--json", action="store_true", help="print the scores as one JSON line")
    args = ap.parse_args(argv)
    if args.prompts < 1:
        ap.error(f"--prompts: got {args.prompts}; allowed: at least 1")
    import torch
    torch.set_num_threads(args.threads)
    strength = args.strength if args.strength is not None else DEFAULTS[args.task]["strength"]
    guidance = args.guidance if args.guidance is not None else DEFAULTS[args.task]["guidance"]
    cases = img2img_cases(args.prompts) if args.task == "img2img" else inpaint_cases(args.prompts, scene=args.scene)
    engine = make_engine(args.backend, args.dtype, onnx_dir=args.onnx_dir)
    t = time.perf_counter()
    images = run(engine, cases, strength, args.steps, guidance)
    seconds = time.perf_counter() - t
    res = (score_img2img if args.task == "img2img" else score_inpaint)(cases, images)
    verdicts = res.pop("verdicts")
    for i, (c, v) in enumerate(zip(cases, verdicts)):
        if not v.ok:
            print(f"  miss seed {i}: {c.prompt!r}: {v}")
    res.update(task=args.task, backend=args.backend, dtype=args.dtype, strength=strength, guidance=guidance,
               steps=args.steps, scene=args.scene if args.task == "inpaint" else None, seconds=round(seconds, 1))
    d = engine.describe()
    print(f"{args.task} on {d.get('backend')} {d.get('dtype')}: {res['n']} held-out prompts, strength {strength}, "
          f"guidance {guidance}, {args.steps} steps, seed i for case i, {seconds:.1f} s")
    if args.task == "img2img":
        print(f"  judged ok (shape colour and background): {res['ok']:.1%}; shape colour {res['shape_colour']:.1%}, "
              f"background {res['background']:.1%}, kept in place {res['kept_in_place']:.1%} "
              f"(inputs already ok: {res['inputs_ok']:.1%})")
    else:
        print(f"  judged ok (prompted colour in the mask, outside >= {KEPT_PSNR_DB:g} dB): {res['ok']:.1%}; "
              f"colour in the mask {res['region']:.1%}, outside kept {res['kept']:.1%} (PSNR median "
              f"{res['kept_psnr_median']:.1f} dB, min {res['kept_psnr_min']:.1f} dB; inputs already ok: "
              f"{res['inputs_ok']:.1%})")
    if args.json:
        print(json.dumps(res))
    if args.grid:
        rows = [np.concatenate([np.asarray(c.image), np.asarray((c.mask or Image.new("L", c.image.size)).convert("RGB")),
                                np.asarray(im)], 1) for c, im in zip(cases, images)]
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)
    return res


if __name__ == "__main__":
    main()
