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

from .errors import FastSDError, InvalidParameter, ModelLoadError  # noqa: E402
from .options import (OneLineParser, check_generation_args, generation_options, image_options,  # noqa: E402
                      kind_inputs, load_for, lora_refs, model_options, optimize_config, output_paths, read_images)

# Feature areas add their own subcommands: module -> `register(subparsers, parents)`.
EXTRA_COMMANDS = ["fastsd.export.cli", "fastsd.bench.cli", "fastsd.serving.cli", "fastsd.batch.cli", "fastsd.ui.cli"]


# -- commands --------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .optimize import optimize  # lazy: torch after parsing
    prompts = args.prompt
    paths = output_paths(args.out, len(prompts) * max(1, args.num_images if isinstance(args.num_images, int) else 1))
    check_generation_args(args)
    loras = lora_refs(args)
    image, mask = read_images(args)
    extra = kind_inputs(args)
    config = optimize_config(args)
    if args.profile and not args.quiet:
        from .profiles import device_class, profile_flags  # lazy: torch after parsing
        picked = ", ".join(f"{k}={v}" for k, v in profile_flags(args.profile, config.device).items())
        print(f"profile {args.profile} on {device_class(config.device)}: {picked}", file=sys.stderr)
    engine = optimize(load_for(args, config.backend), config)
    if loras:
        engine.set_loras(loras, allow_pickle=args.allow_pickle)
    steps = 50 if args.steps is None else args.steps
    result = engine.generate(prompts, args.negative, num_images_per_prompt=args.num_images,
                             num_inference_steps=steps, guidance_scale=args.guidance,
                             height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler,
                             progress=not args.quiet, image=image, mask_image=mask, strength=args.strength,
                             resize=args.resize, eta=args.eta, **extra)
    judge = None if args.upscale else _judge_for(engine)
    images, described = result.images, engine.describe()
    if args.scheduler:  # the request's scheduler ran, not the model's default that describe() names
        described["scheduler"] = args.scheduler
    if args.upscale:  # the chain: the x4 upscaler over each image, the base image kept beside it
        from .upscale_chain import upscale_images  # lazy: torch after parsing
        for path, base in zip(paths, images):
            base.save(path.with_name(f"{path.stem}-base{path.suffix}"))
        del engine
        upscaler = optimize(load_for(args, config.backend, spec=args.upscaler), config)
        images, secs = upscale_images(upscaler, images, result.prompts, result.seeds, negative_prompt=args.negative,
                                      steps=steps, guidance=args.guidance, progress=not args.quiet)
        if not args.quiet:
            print(f"upscaled 4x with {upscaler.model.name} in {secs:.2f}s (the images before: *-base)",
                  file=sys.stderr)
    for path, image, prompt, seed, flagged in zip(paths, images, result.prompts, result.seeds,
                                                  result.nsfw_content_detected):
        image.save(path)
        note = " (flagged by the safety checker: black image)" if flagged else ""
        verdict = f"  judge: {judge(image, prompt)}" if judge else ""
        print(f"{path}  seed={seed}{note}{verdict}")
    t = result.timings
    if not args.quiet:
        print(f"{described}  total {t['total']:.2f}s, unet step {t['unet_step'] * 1000:.1f} ms, "
              f"vae {t['vae_decode']:.2f}s" + (f", vae encode {t['vae_encode']:.2f}s" if "vae_encode" in t else ""),
              file=sys.stderr)
    return 0


def _judge_for(engine):
    """The shapes judge, for the model it knows how to read (fastsd-shapes)."""
    if engine.model.name != "fastsd-shapes":
        return None
    from .judge import judge  # lazy: torch after parsing

    def verdict(image, prompt):
        try:
            return judge(image, prompt)
        except ValueError:  # a prompt outside the model's grammar: nothing to judge
            return "none (the prompt is outside the fastsd-shapes grammar)"
    return verdict


def _fmt_psnr(v: float | None) -> str:
    return "inf" if v is None or math.isinf(v) else f"{v:.1f}"


def cmd_verify(args) -> int:
    from .verify import verify_each, with_intervals  # lazy: torch after parsing
    check_generation_args(args)
    if args.pipeline:  # the drop-in: diffusers' own pipelines, plain and accelerated
        return _verify_pipelines(args)
    loras = lora_refs(args)
    image, mask = read_images(args, own_defaults=True)
    extra = kind_inputs(args, own_defaults=True)
    if (args.task or "text2img") == "text2img" and image is not None and not extra:
        raise InvalidParameter("image", args.image, "--image only with --task img2img or inpaint (or a depth or "
                               "upscale model)")
    intervals = _intervals(args.cache_interval)
    args.cache_interval = intervals[0] if intervals else None
    config = optimize_config(args)
    configs = with_intervals(config, intervals) if len(intervals) > 1 else [config]
    model, engine_model = load_for(args, config.backend), None
    if model.source == "onnx":  # the export runs in the engine; the model it came from is the reference
        from .export import reference_model  # lazy: torch after parsing
        model, engine_model = reference_model(model, safety_checker=not args.no_safety_checker), model
    common = dict(prompts=args.prompt or None, negative_prompt=args.negative, num_images_per_prompt=args.num_images,
                  steps=25 if args.steps is None else args.steps, guidance=args.guidance, height=args.height,
                  width=args.width, seed=args.seed if args.seed is not None else 0, scheduler=args.scheduler,
                  progress=not args.quiet, engine_model=engine_model, image=image, strength=args.strength,
                  eta=args.eta)
    if model.kind in ("depth", "upscale"):  # the task is the model's; it makes its own inputs
        from .verify_kinds import verify_each as verify_kind  # lazy: torch after parsing
        for name, value in (("task", args.task), ("mask", args.mask), ("lora", loras or None)):
            if value is not None:
                raise InvalidParameter(name, value, f"nothing with a {model.kind} model (its task is its own)")
        runs, _ = verify_kind(model, configs, **common, **extra)
    else:
        if extra:
            name = next(iter(extra))
            raise InvalidParameter(name, getattr(args, name), "only with a depth model (--depth-map) or the x4 "
                                   "upscaler (--noise-level, --tile-size)")
        runs, _ = verify_each(model, configs, **common, loras=loras, allow_pickle=args.allow_pickle,
                              task=args.task or "text2img", mask_image=mask)
    for report, engine, _ in runs:
        tol = report["tolerance"]
        cached = report["config"]["cache_interval"]
        print(f"fastsd verify: {report['model']}  task {report['task']}"
              + (f" (strength {report['strength']:g})" if report["strength"] is not None else "")
              + (f" (noise level {report['noise_level']}, input {report['input_size'][0]}x{report['input_size'][1]})"
                 if report.get("noise_level") is not None else "")
              + (f" (depth map {report['depth_map']})" if report.get("depth_map") else "")
              + f"  {engine.describe()}")
        print(f"  {report['steps']} steps, guidance {report['guidance']}" + (f", eta {report['eta']:g}" if report['eta']
                                                                               else "") +
              f", {report['width']}x{report['height']}, "
              f"scheduler {report['scheduler']}" + (f", step cache interval {cached}" if cached > 1 else "") +
              f"; tolerance ({tol['name']}): max abs <= {tol['max_abs']:g}, "
              f"PSNR >= {tol['min_psnr']:g} dB, latent cosine >= {tol['min_latent_cosine']}")
        print(f"  {'#':>2} {'seed':>6} {'max abs':>8} {'PSNR dB':>8} {'latent cos':>12}  result  prompt")
        for r in report["images"]:
            print(f"  {r['index']:>2} {r['seed']:>6} {r['max_abs']:>8.0f} {_fmt_psnr(r['psnr_db']):>8} "
                  f"{r['latent_cosine']:>12.8f}  {'ok' if r['passed'] else 'FAIL':6}  {r['prompt'][:50]}")
        print(f"  time: reference (diffusers FP32) {report['reference_seconds']:.2f}s, "
              f"fastsd {report['engine_seconds']:.2f}s")
        print("PASS" if report["passed"] else "FAIL: beyond the tolerance " + tol["name"])
    if args.json:
        reports = [r for r, _, _ in runs]
        Path(args.json).write_text(json.dumps(reports[0] if len(reports) == 1 else {"runs": reports}, indent=2,
                                              default=str, allow_nan=False))
    return 0 if all(r["passed"] for r, _, _ in runs) else 1


def _intervals(text) -> list[int]:
    """--cache-interval for verify: one interval or a comma list, each checked."""
    if text is None:
        return []
    from .step_cache import check_interval  # lazy: torch after parsing
    return [check_interval(t) for t in str(text).split(",")]


def _verify_pipelines(args) -> int:
    """verify --pipeline: each kind of diffusers pipeline over the model, plain (the reference), then after
    fastsd.accelerate with the engine flags given, on the same inputs and seed."""
    from .accelerate import deaccelerate  # lazy: torch after parsing
    # lazy: torch after parsing
    from .pipeline_verify import build_pipeline, check_kinds, sample_inputs, verify_pipeline
    kinds = check_kinds(args.pipeline)
    if args.backend not in (None, "torch", "openvino"):  # openvino's runners export into its cache, once
        raise InvalidParameter("backend", args.backend, "torch or openvino with --pipeline (fastsd.accelerate(pipe, "
                               "backend='onnxruntime') in Python: accelerate exports the pipeline itself)")
    if args.controlnet and not (Path(args.controlnet).expanduser() / "config.json").is_file():
        raise InvalidParameter("controlnet", args.controlnet, "a diffusers ControlNet folder (with config.json)")
    config = optimize_config(args)
    if config.backend == "openvino":  # before the plain runs: what its runners cannot take is a one-line error now
        from .backends.openvino.backend import check_config  # lazy: torch after parsing
        check_config(config, "fastsd.accelerate with the openvino backend")
    model = load_for(args)
    if args.scheduler:  # diffusers' own scheduler class in the pipeline, on both sides of the comparison
        from .schedulers import make_scheduler  # lazy: torch after parsing
        model.scheduler = make_scheduler(args.scheduler, model.scheduler.config)
    controlnet = None
    if "controlnet" in kinds and args.controlnet:
        from diffusers import ControlNetModel
        try:
            controlnet = ControlNetModel.from_pretrained(str(Path(args.controlnet).expanduser()), local_files_only=True)
        except (OSError, ValueError) as e:
                raise ModelLoadError(f"controlnet: cannot load {args.controlnet}: {str(e).splitlines()[0][:200]}") from e
    size = args.height or args.width or model.native_size
    prompt = (args.prompt or ["a red circle on a blue background"])[0]
    reports, ok = {}, True
    for kind in kinds:
        pipe = build_pipeline(model, kind, controlnet)
        r = verify_pipeline(pipe, prompt=prompt, negative_prompt=args.negative, config=config,
                            seed=args.seed if args.seed is not None else 0, guidance_scale=args.guidance,
                            num_images_per_prompt=args.num_images,
                            num_inference_steps=25 if args.steps is None else args.steps, eta=args.eta,
                            **sample_inputs(kind, size))
        deaccelerate(pipe)  # the next kind builds on the same modules, plain again
        reports[kind], ok = r, ok and r["passed"]
        rows = r["images"]  # the worst image of the call
        print(f"{type(pipe).__name__:<36} max abs {max(x['max_abs'] for x in rows):>4.0f}  PSNR "
              f"{_fmt_psnr(min(x['psnr_db'] for x in rows)):>5} dB  latent cos "
              f"{min(x['latent_cosine'] for x in rows):.8f}  {'ok' if r['passed'] else 'FAIL'}  plain "
              f"{r['reference_seconds']:.2f}s, accelerated {r['accelerated_seconds']:.2f}s  "
              f"({', '.join(r['accelerate']['applied'])})")
    tol = next(iter(reports.values()))["tolerance"]
    random_cn = "controlnet" in kinds and controlnet is None
    print(f"tolerance ({config.dtype}): max abs <= {tol['max_abs']:g}, PSNR >= {tol['min_psnr']:g} dB, "
          f"latent cosine >= {tol['min_latent_cosine']}; {model.name}, {size}x{size}, seed "
          f"{args.seed if args.seed is not None else 0}"
          + ("; ControlNet: random weights from the UNet's config" if random_cn else ""))
    print("PASS" if ok else "FAIL: beyond the tolerance of " + config.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2, default=str))
    return 0 if ok else 1


def cmd_models(args) -> int:
    from .loading import build_random  # lazy: torch after parsing
    from .presets import PRESETS  # lazy: torch after parsing
    print(f"{'preset':<12} {'size':>5} {'prediction':<13} {'sched':<6} {'text enc':>9} {'unet':>9} {'vae':>8} "
          f"{'safety':>8} {'depth':>8}  hub id")
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
              f"{m('unet'):>9} {m('vae'):>8} {m('safety_checker'):>8} {m('depth_estimator'):>8}  {origin}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fastsd", description="Fast Stable Diffusion inference, checked against the FP32 diffusers pipeline.")
    parser.add_argument("--version", action="version", version="fastsd " + __import__("fastsd").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    mo, go = model_options(), generation_options()

    g = sub.add_parser("generate", parents=[mo, go, image_options()], help="generate images from prompts",
                       description="Generate images from one or more prompts; with --image, image-to-image; "
                                   "with --image and --mask, inpainting.")
    g.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    g.add_argument("--out", "-o", default="out/image.png", help="image path; several images get -0, -1, ...")
    g.add_argument("--upscale", action="store_true",
                   help="then run the x4 upscaler on each image (its prompt and seed): 512 -> 2048; the image "
                        "before is kept as *-base.png")
    g.add_argument("--upscaler", default="sd-x4-upscaler", metavar="DIR|PRESET",
                   help="with --upscale: the x4 upscaler folder or preset (default sd-x4-upscaler)")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", parents=[mo, go, image_options()], help="compare a configuration with the FP32 diffusers pipeline",
                       description="Run the FP32 diffusers StableDiffusionPipeline (the reference) and the fastsd "
                                   "configuration on the same prompts and seeds, and compare the images. Exits 1 "
                                   "when an image is beyond the tolerance of the configuration's dtype.")
    v.add_argument("prompt", nargs="*", help="prompts (default: two sample prompts)")
    v.add_argument("--json", help="write the figures to this JSON file")
    v.add_argument("--task", default=None, choices=["text2img", "img2img", "inpaint"],
                   help="text2img (StableDiffusionPipeline, the default), img2img (StableDiffusionImg2ImgPipeline) or "
                        "inpaint (StableDiffusionInpaintPipeline); the image and mask default to a drawn disc and its "
                        "top-left quarter at the model's size, or --image/--mask. A depth or x4 upscaler model is "
                        "compared with StableDiffusionDepth2ImgPipeline / StableDiffusionUpscalePipeline on its own "
                        "test image (and depth map) without --task")
    v.add_argument("--pipeline", metavar="KINDS",
                   help="compare diffusers' own pipelines plain and after fastsd.accelerate instead: a comma list of "
                        "txt2img, img2img, inpaint, controlnet (ControlNet: --controlnet DIR, else random weights); "
                        "--backend torch (default) or openvino (its module runners)")
    v.add_argument("--controlnet", metavar="DIR", help="with --pipeline controlnet: a diffusers ControlNet folder")
    v.set_defaults(func=cmd_verify)

    ms = sub.add_parser("models", help="list the presets and their parameter counts (depth: a depth model's DPT "
                                       "estimator)")
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
