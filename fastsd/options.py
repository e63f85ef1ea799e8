"""Command-line options and checks shared by every `fastsd` command (generate, verify, export, bench,
serve, ...): the model source, the engine flags, the generation flags and output paths. The command
modules import from here, never from each other, so imports point down only."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import InvalidParameter
from .profiles import PROFILE_NAMES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value is one line naming the parameter (exit 2), not the whole usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class Once(argparse.Action):
    """An option that takes one value: given twice, it is an error rather than the last one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(f"argument {option_string}: given twice; give it once ({self.help})")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def add_model_source(g, default: str | None = None) -> None:
    """Where a model comes from (--model, --random-weights, --config, --allow-pickle): every command's."""
    from .presets import DEFAULT_MODEL  # lazy: torch after parsing
    default = default or DEFAULT_MODEL
    g.add_argument("--model", "-m", default=default,
                   help=f"preset name, hub id, local diffusers folder or .safetensors file (default: {default})")
    g.add_argument("--random-weights", action="store_true",
                   help="build the preset's full architecture with seeded random weights (seed 0; no download)")
    g.add_argument("--config", help="for a single checkpoint file: the preset whose architecture it has")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt pickle checkpoints (loaded with weights_only=True)")
    g.add_argument("--vae-tiny", metavar="DIR",
                   help="a tiny VAE (AutoencoderTiny, TAESD format, e.g. madebyollin/taesd) folder that decodes and "
                        "encodes in place of the model's VAE")


def add_lora_option(g) -> None:
    """--lora FILE[:SCALE], repeatable: LoRA adapters fused into the weights (fastsd/lora.py)."""
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors file (diffusers/PEFT or kohya layout) fused at SCALE (default 1); "
                        "repeat for several")


def lora_refs(args) -> tuple:
    """The --lora set, checked (files exist, scales are numbers, pickles only with --allow-pickle) before any
    model is loaded."""
    from .lora import PICKLE_SUFFIXES, as_refs  # lazy: torch after parsing
    refs = as_refs(getattr(args, "lora", None) or [])
    for r in refs:
        path = Path(r.path).expanduser()
        if not path.is_file():
            raise InvalidParameter("lora", r.path, "an existing LoRA file (FILE[:SCALE])")
        if path.suffix in PICKLE_SUFFIXES and not getattr(args, "allow_pickle", False):
            raise InvalidParameter("lora", r.path, "a .safetensors file (pickled LoRA files load only with "
                                   "--allow-pickle)")
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise InvalidParameter("lora", r.path, "a .safetensors file (or .bin/.pt/.ckpt with --allow-pickle)")
    return refs


def model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    add_model_source(g)
    g.add_argument("--backend", default=None, help="torch | onnxruntime | openvino (default: torch, or the profile's)")
    g.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                   help="exact (default: FP32, bit-identical to diffusers) | fast (fastest measured within the "
                        "bf16 tolerance) | fastest (trades more fidelity); flags given explicitly win")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="compute dtype (default: fp32, or the profile's)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when visible)")
    g.add_argument("--attention", default=None,
                   help="auto | sdpa | math | triton | xformers (default: auto, or the profile's)")
    g.add_argument("--fused-ops", action="store_true", help="fused GroupNorm+SiLU, GEGLU and QKV kernels")
    g.add_argument("--attention-slicing", default="auto", choices=["auto", "on", "off"],
                   help="slice attention over batch*heads; auto: only when the estimated peak would not fit")
    g.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"],
                   help="decode large images in tiles; auto: only when the estimated peak would not fit")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: replay the UNet step from graphs cached per shape (logged off elsewhere)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CPU: with weight freezing); minutes of compiling per shape")
    g.add_argument("--cache-interval", default=None, metavar="N",
                   help="step caching: the whole UNet every N-th step, its shallow layers between (1: off; default: "
                        "1, or the profile's); verify takes a comma list (1,2,3) and reports each")
    g.add_argument("--int8", nargs="?", const="hybrid", default=None, choices=["off", "hybrid", "full"],
                   help="openvino backend: int8 UNet by NNCF post-training quantization (hybrid: int8 convolutions, "
                        "int8 weights in the MatMuls; full: MatMul activations too); calibrated once, cached")
    g.add_argument("--calibration-prompts", metavar="FILE",
                   help="prompts for the int8 calibration, one a line (default: a shipped set of 8)")
    g.add_argument("--no-safety-checker", action="store_true", help="skip the safety checker")
    add_lora_option(g)
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
    g.add_argument("--scheduler", help="pndm | ddim | euler | euler-ancestral | dpm++ | lms | lcm | tcd (default: "
                                       "the model's own scheduler config); lcm and tcd: 2-8 steps with an LCM/TCD "
                                       "model or LoRA, --guidance 1")
    g.add_argument("--eta", type=float, default=0.0,
                   help="DDIM's eta and TCD's gamma, in [0, 1] (default 0.0, as diffusers' pipelines)")
    g.add_argument("--negative", default=None, action=Once, help="one negative prompt, for every prompt")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    return p


def image_options(resize: bool = True) -> argparse.ArgumentParser:
    """Image-to-image and inpainting inputs (generate; verify has its own defaults). resize=False: no
    --resize (query: the deployment takes the image at its own size)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("image-to-image and inpainting")
    g.add_argument("--image", help="start image (PNG, JPEG or WebP): image-to-image, or with --mask inpainting; "
                                   "the output has its size")
    g.add_argument("--mask", help="inpainting mask of the image's size: white = repaint, black = keep")
    g.add_argument("--strength", type=float, default=None,
                   help="in (0, 1]: how much of the image is repainted; the last int(steps*strength) steps run "
                        "(default 0.8 for image-to-image, 1.0 for inpainting)")
    if resize:
        g.add_argument("--resize", action="store_true",
                       help="resize the image (and mask) to --height/--width, or its size rounded down to a multiple "
                            "of 8; without it an image of another size is refused")
    add_kind_options(p)
    return p


def add_kind_options(p) -> None:
    """The inputs of a depth-to-image model and of the x4 upscaler (fastsd.tasks_depth, fastsd.tasks_upscale)."""
    g = p.add_argument_group("depth-to-image and the x4 upscaler")
    g.add_argument("--depth-map", metavar="FILE",
                   help="depth model: a grayscale PNG (8- or 16-bit) or a .npy HxW float array, larger = nearer "
                        "(default: the folder's own DPT depth estimator)")
    g.add_argument("--noise-level", type=int, default=None,
                   help="x4 upscaler: noise added to the low-res image, 0..max_noise_level (350); default 20")
    g.add_argument("--tile-size", type=int, default=None,
                   help="x4 upscaler: the UNet runs on windows of this many input pixels a side, overlapping by a "
                        "quarter and blended (default 128); the output is 4x the input")


def kind_inputs(args, own_defaults: bool = False) -> dict:
    """--depth-map, --noise-level, --tile-size as generate's keywords (only those given), the depth map read now,
    before a model loads. own_defaults: the command supplies an image itself (verify)."""
    from . import depth  # lazy: torch after parsing
    given = {k: getattr(args, k, None) for k in ("depth_map", "noise_level", "tile_size")}
    given = {k: v for k, v in given.items() if v is not None}
    if given and not args.image and not own_defaults:
        name = next(iter(given))
        raise InvalidParameter(name, given[name], "only together with --image")
    if "depth_map" in given:
        given["depth_map"] = depth.read_depth_map(given["depth_map"], "depth_map")
    return given


def read_images(args, own_defaults: bool = False):
    """(image, mask) as PIL images from --image/--mask, checked before a model is loaded. own_defaults: the
    command supplies an image itself (verify), so --strength and --resize stand without --image."""
    from . import tasks  # lazy: torch after parsing
    from .images import read_file  # lazy: torch after parsing
    if args.mask and not args.image:
        raise InvalidParameter("mask", args.mask, "a mask only together with --image")
    if args.strength is not None:
        tasks.strength_value(args.strength)
    if not args.image:
        if own_defaults:
            return None, None
        if args.strength is not None or getattr(args, "resize", False):
            raise InvalidParameter("strength" if args.strength is not None else "resize",
                                   args.strength if args.strength is not None else True, "only together with --image")
        return None, None
    image = read_file(args.image, "image")
    mask = read_file(args.mask, "mask", mode="L") if args.mask else None
    if mask is not None and mask.size != image.size:
        raise InvalidParameter("mask", f"{mask.size[0]}x{mask.size[1]}", f"the image's size {image.size[0]}x{image.size[1]}")
    return image, mask


def optimize_config(args):
    """The engine flags: the profile's (exact unless --profile), then every flag the user gave."""
    from .optimize import OptimizeConfig  # lazy: torch after parsing
    given = {k: getattr(args, k) for k in ("dtype", "attention", "backend", "int8", "calibration_prompts") if getattr(args, k, None) is not None}
    given.update({k: True for k in ("fused_ops", "cuda_graphs", "compile") if getattr(args, k)})
    if getattr(args, "cache_interval", None) is not None:
        from .step_cache import check_interval  # lazy: torch after parsing
        given["cache_interval"] = check_interval(args.cache_interval)
    return OptimizeConfig.from_profile(args.profile or "exact", device=args.device,
                                       safety_checker=not args.no_safety_checker,
                                       attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                                       **given).validated()


def check_generation_args(args) -> None:
    """Everything a user can get wrong about a generation, checked before a model is loaded."""
    from . import validation as check  # lazy: torch after parsing
    from .presets import check_config  # lazy: torch after parsing
    from .schedulers import check_scheduler  # lazy: torch after parsing
    if getattr(args, "config", None) is not None:
        check_config(args.model, args.config)
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
    check.eta(getattr(args, "eta", 0.0))
    if getattr(args, "vae_tiny", None):
        from .tiny_vae import load_tiny_vae  # lazy: torch after parsing
        load_tiny_vae(args.vae_tiny)  # the folder is checked before the model loads


def load_for(args, backend: str | None = None, spec: str | None = None):
    """The model for `backend` (the engine config's; else --backend, else torch): --model, or `spec`."""
    from .backends import load_for_backend  # lazy: torch after parsing
    return load_for_backend(backend or args.backend or "torch", spec or args.model, random_weights=args.random_weights,
                            allow_pickle=args.allow_pickle, config=args.config,
                            safety_checker=not args.no_safety_checker, vae_tiny=getattr(args, "vae_tiny", None))


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
