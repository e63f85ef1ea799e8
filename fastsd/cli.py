"""The `fastsd` command line. Errors a user can fix print one line and exit 2; no tracebacks."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path

# Library chatter (torchvision missing, dtype-cast notices) is not for CLI users; set before any import.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from .errors import FastSDError, InvalidParameter  # noqa: E402

# Feature areas add their own subcommands: module -> `register(subparsers, parents)`.
EXTRA_COMMANDS = ["fastsd.export.cli", "fastsd.bench.cli", "fastsd.serving.cli"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# -- shared options --------------------------------------------------------------------------------
def add_model_source(g, default: str | None = None) -> None:
    """Where a model comes from (--model, --random-weights, --config, --allow-pickle): every command's."""
    from .presets import DEFAULT_MODEL
    default = default or DEFAULT_MODEL
    g.add_argument("--model", "-m", default=default,
                   help=f"preset name, hub id, local diffusers folder or .safetensors file (default: {default})")
    g.add_argument("--random-weights", action="store_true",
                   help="build the preset's full architecture with seeded random weights (seed 0; no download)")
    g.add_argument("--config", help="for a single checkpoint file: the preset whose architecture it has")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt pickle checkpoints (loaded with weights_only=True)")


def model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    add_model_source(g)
    g.add_argument("--backend", default="torch", help="torch | onnxruntime (default: torch)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="compute dtype (default: fp32)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    g.add_argument("--attention", default="auto", help="auto | sdpa | math | triton | xformers (default: auto)")
    g.add_argument("--fused-ops", action="store_true", help="fused GroupNorm+SiLU, GEGLU and QKV kernels")
    g.add_argument("--attention-slicing", default="auto", choices=["auto", "on", "off"],
                   help="slice attention over batch*heads; auto: only when the estimated peak would not fit")
    g.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"],
                   help="decode large images in tiles; auto: only when the estimated peak would not fit")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: replay the UNet step from graphs cached per shape (logged off elsewhere)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CPU: with weight freezing); minutes of compiling per shape")
    g.add_argument("--no-safety-checker", action="store_true", help="skip the safety checker")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info logs")
    return p


def generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="denoising steps, 1..1000 (default: 50; verify: 25)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; off at <= 1 (default 7.5)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 8 in 64..2048 (default: the model's size)")
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 in 64..2048 (default: the model's size)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i")
    g.add_argument("--scheduler", help="pndm | ddim | euler | euler-ancestral | dpm++ | lms (default: the model's)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    return p


def optimize_config(args):
    from .optimize import OptimizeConfig
    return OptimizeConfig(backend=args.backend, device=args.device, dtype=args.dtype, attention=args.attention,
                          fused_ops=args.fused_ops, safety_checker=not args.no_safety_checker,
                          attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                          cuda_graphs=args.cuda_graphs, compile=args.compile).validated()


def check_generation_args(args) -> None:
    """Everything a user can get wrong about a generation, checked before a model is loaded."""
    from . import validation as check
    from .schedulers import check_scheduler
    for p in getattr(args, "prompt", None) or []:
        check.prompts(p)
    if args.steps is not None:
        check.steps(args.steps)
    check.guidance(args.guidance)
    check.num_images(args.num_images)
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check.size(name, getattr(args, name))
    if args.seed is not None:
        check.seeds(args.seed, 1)
    if args.scheduler is not None:
        check_scheduler(args.scheduler)


def load_for(args):
    from .loading import load_for_backend
    return load_for_backend(args.backend, args.model, random_weights=args.random_weights,
                            allow_pickle=args.allow_pickle, config=args.config,
                            safety_checker=not args.no_safety_checker)


def output_paths(out: str, count: int) -> list[Path]:
    """Where `count` images go; checked before any model runs so a bad path fails fast."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidParameter("out", out, "a file name ending in " + ", ".join(sorted(IMAGE_SUFFIXES)))
    parent = path.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidParameter("out", out, f"a path in a writable folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidParameter("out", out, "a path in a writable folder")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


# -- commands --------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .optimize import optimize
    prompts = args.prompt
    paths = output_paths(args.out, len(prompts) * max(1, args.num_images if isinstance(args.num_images, int) else 1))
    check_generation_args(args)
    config = optimize_config(args)
    engine = optimize(load_for(args), config)
    result = engine.generate(prompts, args.negative, num_images_per_prompt=args.num_images,
                             num_inference_steps=50 if args.steps is None else args.steps, guidance_scale=args.guidance,
                             height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler,
                             progress=not args.quiet)
    judge = _judge_for(engine)
    for path, image, prompt, seed, flagged in zip(paths, result.images, result.prompts, result.seeds,
                                                  result.nsfw_content_detected):
        image.save(path)
        note = " (flagged by the safety checker: black image)" if flagged else ""
        verdict = f"  judge: {judge(image, prompt)}" if judge else ""
        print(f"{path}  seed={seed}{note}{verdict}")
    t = result.timings
    if not args.quiet:
        print(f"{engine.describe()}  total {t['total']:.2f}s, unet step {t['unet_step'] * 1000:.1f} ms, "
              f"vae {t['vae_decode']:.2f}s", file=sys.stderr)
    return 0


def _judge_for(engine):
    """The shapes judge, for the model it knows how to read (fastsd-shapes)."""
    if engine.model.name != "fastsd-shapes":
        return None
    from .judge import judge

    def verdict(image, prompt):
        try:
            return judge(image, prompt)
        except ValueError:  # a prompt outside the model's grammar: nothing to judge
            return "none (the prompt is outside the fastsd-shapes grammar)"
    return verdict


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def cmd_verify(args) -> int:
    from .verify import verify
    check_generation_args(args)
    config = optimize_config(args)
    model, engine_model = load_for(args), None
    if args.backend == "onnxruntime":  # the export runs in the engine; the model it came from is the reference
        from .export import reference_model
        model, engine_model = reference_model(model, safety_checker=not args.no_safety_checker), model
    report, engine, result, _ = verify(model, config, prompts=args.prompt or None,
                                       negative_prompt=args.negative, num_images_per_prompt=args.num_images,
                                       steps=25 if args.steps is None else args.steps, guidance=args.guidance, height=args.height,
                                       width=args.width, seed=args.seed if args.seed is not None else 0,
                                       scheduler=args.scheduler, progress=not args.quiet, engine_model=engine_model)
    tol = report["tolerance"]
    print(f"fastsd verify: {report['model']}  {engine.describe()}")
    print(f"  {report['steps']} steps, guidance {report['guidance']}, {report['width']}x{report['height']}, "
          f"scheduler {report['scheduler']}; tolerance ({config.dtype}): max abs <= {tol['max_abs']:g}, "
          f"PSNR >= {tol['min_psnr']:g} dB, latent cosine >= {tol['min_latent_cosine']}")
    print(f"  {'#':>2} {'seed':>6} {'max abs':>8} {'PSNR dB':>8} {'latent cos':>12}  result  prompt")
    for r in report["images"]:
        print(f"  {r['index']:>2} {r['seed']:>6} {r['max_abs']:>8.0f} {_fmt_psnr(r['psnr_db']):>8} "
              f"{r['latent_cosine']:>12.8f}  {'ok' if r['passed'] else 'FAIL':6}  {r['prompt'][:50]}")
    print(f"  time: reference (diffusers FP32) {report['reference_seconds']:.2f}s, "
          f"fastsd {report['engine_seconds']:.2f}s")
    print("PASS" if report["passed"] else "FAIL: beyond the tolerance of " + config.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["passed"] else 1


def cmd_models(args) -> int:
    from .loading import build_random
    from .presets import PRESETS
    print(f"{'preset':<12} {'size':>5} {'prediction':<13} {'sched':<6} {'text enc':>9} {'unet':>9} {'vae':>8} "
          f"{'safety':>8}  hub id")
    for p in PRESETS.values():
        if args.preset and p.name not in args.preset:
            continue
        import torch
        with torch.device("meta"):  # counts need shapes only; no memory, no time
            counts = build_random(p).parameter_counts()

        def m(k):
            return f"{counts[k] / 1e6:.2f}M" if k in counts else "-"
        origin = p.hub_id or ("(packaged)" if p.local_path else "(none: random by design)")
        print(f"{p.name:<12} {p.size:>5} {p.prediction_type:<13} {p.scheduler:<6} {m('text_encoder'):>9} "
              f"{m('unet'):>9} {m('vae'):>8} {m('safety_checker'):>8}  {origin}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsd", description="Fast Stable Diffusion inference, checked against the FP32 diffusers pipeline.")
    parser.add_argument("--version", action="version", version="fastsd " + __import__("fastsd").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    mo, go = model_options(), generation_options()

    g = sub.add_parser("generate", parents=[mo, go], help="generate images from prompts",
                       description="Generate images from one or more prompts.")
    g.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    g.add_argument("--out", "-o", default="out/image.png", help="image path; several images get -0, -1, ...")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", parents=[mo, go], help="compare a configuration with the FP32 diffusers pipeline",
                       description="Run the FP32 diffusers StableDiffusionPipeline (the reference) and the fastsd "
                                   "configuration on the same prompts and seeds, and compare the images. Exits 1 "
                                   "when an image is beyond the tolerance of the configuration's dtype.")
    v.add_argument("prompt", nargs="*", help="prompts (default: two sample prompts)")
    v.add_argument("--json", help="write the figures to this JSON file")
    v.set_defaults(func=cmd_verify)

    ms = sub.add_parser("models", help="list the presets and their parameter counts")
    ms.add_argument("preset", nargs="*", help="only these presets")
    ms.set_defaults(func=cmd_models)

    for name in EXTRA_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # that feature area is not installed
                continue
            raise
        module.register(sub, [mo, go])
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(name)s: %(message)s")
    # the loaders' own progress bars (components, weight shards) say nothing on a local load
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        return args.func(args)
    except FastSDError as e:
        print(f"fastsd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
