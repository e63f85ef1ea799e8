"""`fastsd bench`: the diffusers baseline and fastsd configurations, side by side, in one run."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from fastsd import validation as check
from fastsd.backends import backend_names, module_runner_names
from fastsd.errors import InvalidParameter
from fastsd.optimize import DTYPES, OptimizeConfig
from fastsd.options import add_lora_option, add_model_source, lora_refs
from fastsd.profiles import PROFILE_NAMES, profile_flags
from fastsd.tasks import TASKS, strength_value
from fastsd.tiny_vae import load_tiny_vae

from . import fewstep
from .harness import run_bench
from .peer import PEERS, check_peer_python, peer_names, peer_python
from .report import format_report, write_markdown, write_plot
from .settings import ACCELERATE, BASELINE, BenchSettings, ConfigSpec


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _flag_value(text: str):
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        return text


def register(subparsers, parents):
    p = subparsers.add_parser(
        "bench", help="latency of fastsd configurations side by side with the diffusers baseline",
        description="Measure, in one run and on the same inputs, the diffusers StableDiffusionPipeline (FP32, "
                    "the baseline and parity reference; --task img2img|inpaint: its Img2Img / Inpaint pipeline) and "
                    "each fastsd configuration (backend x dtype): per "
                    "component (text encoder, one UNet step with guidance, VAE decode, safety checker) and end "
                    "to end; median/min/p90 of --repeat runs after warm-up; images per second, peak memory, the "
                    "speed-up over the baseline and the PSNR of the final image against it.")
    g = p.add_argument_group("model")
    add_model_source(g, default="tiny")
    g.add_argument("--no-safety-checker", action="store_true", help="leave the safety checker out")
    add_lora_option(g)
    b = p.add_argument_group("what to measure")
    b.add_argument("--backends", "--backend", default="diffusers,torch",
                   help="comma list of diffusers (the baseline, always run first) and fastsd backends "
                        "(torch, onnxruntime, openvino), and accelerate (fastsd.accelerate on the diffusers "
                        "pipeline) or accelerate-openvino, accelerate-onnxruntime (with that backend's module "
                        "runners); one that cannot run here (package missing, no such device or dtype) is skipped "
                        "with its reason, one that fails is an error: exit 1; an item may carry OptimizeConfig flags of "
                        "its own: openvino:int8=hybrid (default: diffusers,torch)")
    b.add_argument("--profile", default="", help="comma list of speed profiles (fast, fastest, exact) to measure as "
                                              "they resolve on this machine, beside the --backends x --dtype items")
    b.add_argument("--peer", default="", help="what a CPU user would run instead, measured beside fastsd: "
                                           + ", ".join(PEERS) + " (optimum-intel's export, cached, and "
                                           "openvino_genai.Text2ImagePipeline with its defaults, static shapes); "
                                           "skipped with the reason when its packages are missing")
    b.add_argument("--peer-python", help="the Python of the environment that has optimum-intel, for the peer's "
                                         "export (default: $FASTSD_PEER_PYTHON, else ./.venv-peer/bin/python "
                                         "(make peer-env), else this Python)")
    b.add_argument("--accelerate", action="store_true",
                   help="add the drop-in: fastsd.accelerate(pipe) on the diffusers pipeline, per --dtype, measured "
                        "beside the plain pipeline and fastsd's engine (same as adding accelerate to --backends), "
                        "and accelerate-B for each listed backend B with module runners (openvino, onnxruntime)")
    b.add_argument("--dtype", default="fp32", help="comma list of fastsd dtypes: fp32, fp16, bf16 (default fp32); an item may carry "
                        "OptimizeConfig flags of its own: bf16:channels_last=true")
    b.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                   help="an OptimizeConfig flag for every fastsd config (repeatable), e.g. --set channels_last=true")
    b.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    b.add_argument("--attention", default="auto", help="fastsd attention: auto | sdpa | math | triton | xformers")
    b.add_argument("--onnx-dir", help="the ONNX export the onnxruntime backend runs (else exported on the fly "
                                      "when fastsd.export can)")
    b.add_argument("--steps", type=int, default=50, help="denoising steps of the end-to-end run (default 50)")
    b.add_argument("--batch", default="1", help="comma list of images per call (default 1)")
    b.add_argument("--resolution", type=int, help="height and width in pixels (default: the model's size)")
    b.add_argument("--height", type=int, help="height (overrides --resolution)")
    b.add_argument("--width", type=int, help="width (overrides --resolution)")
    b.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per component (default 1)")
    b.add_argument("--e2e-warmup", type=int, default=0,
                   help="end-to-end warm-up runs, excluded (default 0: they follow the component warm-ups)")
    b.add_argument("--estimate-steps", type=int, default=50,
                   help="also estimate end to end at this many steps from the component medians (default 50)")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    b.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    b.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    b.add_argument("--scheduler", help="pndm | ddim | euler | euler-ancestral | dpm++ | lms | lcm | tcd (default: "
                                       "the model's)")
    b.add_argument("--task", default="text2img",
                   help="text2img (default), img2img or inpaint: image-to-image / inpainting measured against "
                        "diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on a drawn input "
                        "image (a red disc on blue) and mask (the top-left quarter) at the bench's size, with VAE "
                        "encode as a component; a 9-channel model (tiny-inpainting, sd-1.5-inpainting) takes inpaint "
                        "only, with its inpainting UNet; a 4-channel model inpaints the diffusers way")
    b.add_argument("--strength", type=float,
                   help="img2img / inpaint: how much is repainted, in (0, 1] (default 0.8 for img2img, 1.0 for inpaint)")
    b.add_argument("--few-step", nargs="?", const=fewstep.DEFAULT, metavar="SCHEDULER,STEPS,GUIDANCE",
                   help="also time every configuration at a few-step recipe (alone: lcm,4,1, i.e. LCM, 4 steps, "
                        "guidance 1: one UNet call per step, no classifier-free guidance), end to end, and report "
                        "the time per image beside the run's own generation (--steps, --scheduler, --guidance; by "
                        "default 50 steps at 7.5); with an LCM-LoRA (--lora) the few-step images are the ones to "
                        "look at, e.g. --lora fastsd/models/loras/lcm-shapes.safetensors --few-step tcd,4,1.5")
    b.add_argument("--prompt", default="a red circle on a blue background", help="the prompt")
    b.add_argument("--negative", default="", help="negative prompt (default empty)")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write everything measured to this JSON file")
    o.add_argument("--plot", help="write a PNG bar chart of per-component time per configuration")
    o.add_argument("--markdown", help="write the table as a Markdown page (bench/RESULTS.md) headed by this command")
    o.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: print (and --plot/--markdown) the tables of a saved --json run")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p


def settings_from_args(args):
    backend_items = [item.split(":") for item in _csv(args.backends)]  # "openvino:int8=hybrid": flags for it alone
    backends = [name for name, *_ in backend_items]
    dropins = [ACCELERATE] + [f"{ACCELERATE}-{b}" for b in module_runner_names()]
    if args.accelerate:  # the drop-in, and the drop-in over each listed backend that has module runners
        for name in [ACCELERATE] + [f"{ACCELERATE}-{b}" for b in backends if f"{ACCELERATE}-{b}" in dropins]:
            if name not in backends:
                backends.append(name)
                backend_items.append([name])
    allowed = [BASELINE] + backend_names() + dropins
    for name, *own in backend_items:
        if name not in allowed:
            raise InvalidParameter("backends", name, ", ".join(allowed))
        if own and name == BASELINE:
            raise InvalidParameter("backends", ":".join([name, *own]), "the diffusers baseline without flags")
    known = set(OptimizeConfig.__dataclass_fields__) - {"backend", "device", "dtype", "attention", "safety_checker"}

    def parse_flags(items, name):
        flags = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in known:
                raise InvalidParameter(name, item, "FLAG=VALUE with FLAG one of " + ", ".join(sorted(known)))
            flags[key] = _flag_value(value)
        return flags
    flags = parse_flags(args.set, "set")
    dtypes = []  # "bf16" or "bf16:flag=value:flag=value" (flags for that config only)
    for item in _csv(args.dtype):
        d, *own = item.split(":")
        if d not in DTYPES:
            raise InvalidParameter("dtype", d, ", ".join(DTYPES))
        dtypes.append((d, tuple(sorted({**flags, **parse_flags(own, "dtype")}.items()))))
    try:
        batches = tuple(int(x) for x in _csv(args.batch))
    except ValueError:
        raise InvalidParameter("batch", args.batch, "a comma list of whole numbers, e.g. 1,2,4") from None
    if not batches:
        raise InvalidParameter("batch", args.batch, "a comma list of whole numbers, e.g. 1,2,4")
    for n in batches:
        check.num_images(n)
    for name in ("repeat",):
        if getattr(args, name) < 1:
            raise InvalidParameter(name, getattr(args, name), "1 or more")
    for name in ("warmup", "e2e_warmup"):
        if getattr(args, name) < 0:
            raise InvalidParameter(name.replace("_", "-"), getattr(args, name), "0 or more")
    if args.threads is not None and args.threads < 1:
        raise InvalidParameter("threads", args.threads, "1 or more")
    check.steps(args.steps)
    check.steps(args.estimate_steps)
    if args.vae_tiny:
        load_tiny_vae(args.vae_tiny)  # the folder is checked before anything is measured
    height = args.height or args.resolution
    width = args.width or args.resolution
    if args.task not in TASKS:
        raise InvalidParameter("task", args.task, ", ".join(TASKS))
    if args.strength is not None:
        if args.task == "text2img":
            raise InvalidParameter("strength", args.strength, "only with --task img2img or inpaint")
        strength_value(args.strength)
    if args.few_step:
        fewstep.recipe(args.few_step)  # checked before any model is loaded
    if height is not None:
        check.size("height", height)
    if width is not None:
        check.size("width", width)
    configs = [ConfigSpec(BASELINE)]
    for backend, *own in backend_items:
        if backend != BASELINE:
            own_flags = parse_flags(own, "backends")
            configs += [ConfigSpec(backend, d, tuple(sorted({**dict(f), **own_flags}.items()))) for d, f in dtypes]
    configs += profile_specs(_csv(args.profile), args.device, configs)
    configs += [ConfigSpec(name, "defaults") for name in peer_names(args.peer)]
    python = check_peer_python(args.peer_python) if args.peer_python else peer_python()
    return BenchSettings(
        model=args.model, random_weights=args.random_weights, model_config=args.config,
        allow_pickle=args.allow_pickle, device=args.device, attention=args.attention, configs=configs,
        batches=batches, height=height, width=width, steps=args.steps, repeat=args.repeat, warmup=args.warmup,
        e2e_warmup=args.e2e_warmup, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler,
        prompt=args.prompt, negative=args.negative, estimate_steps=args.estimate_steps,
        safety_checker=not args.no_safety_checker, threads=args.threads, onnx_dir=args.onnx_dir,
        progress=not args.quiet, loras=lora_refs(args), task=args.task, strength=args.strength,
        few_step=args.few_step, vae_tiny=args.vae_tiny, peer_python=python)


def profile_specs(names: list[str], device: str, existing: list) -> list:
    """A ConfigSpec per profile, as the profile resolves on `device` here; a profile that resolves to a
    configuration already listed adds no second row (the listed one is labelled with it)."""
    out = []
    for name in names:
        if name not in PROFILE_NAMES:
            raise InvalidParameter("profile", name, ", ".join(PROFILE_NAMES))
        flags = {k: v for k, v in profile_flags(name, device).items() if k != "device"}
        backend, dtype = flags.pop("backend", "torch"), flags.pop("dtype", "fp32")
        spec = ConfigSpec(backend, dtype, tuple(sorted(flags.items())), profile=name)
        for i, other in enumerate(existing):
            if (other.backend, other.dtype, other.flags) == (backend, dtype, spec.flags) and not other.is_baseline:
                existing[i] = ConfigSpec(backend, dtype, spec.flags,
                                         profile=f"{other.profile},{name}" if other.profile else name)
                break
        else:
            out.append(spec)
    return out


def command_line(args) -> str:
    """The command that repeats this run (every option that matters, written out)."""
    parts = ["fastsd", "bench", "--model", args.model]
    parts += ["--random-weights"] if args.random_weights else []
    for item in args.lora:
        parts += ["--lora", item]
    parts += ["--backends", args.backends] + (["--accelerate"] if args.accelerate else [])
    parts += ["--dtype", args.dtype, "--steps", str(args.steps), "--batch", args.batch]
    if args.task != "text2img":
        parts += ["--task", args.task] + (["--strength", str(args.strength)] if args.strength is not None else [])
    for name in ("resolution", "height", "width", "config", "vae_tiny", "onnx_dir", "threads", "scheduler"):
        if getattr(args, name) is not None:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    parts += ["--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    if args.e2e_warmup:
        parts += ["--e2e-warmup", str(args.e2e_warmup)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.attention != "auto":
        parts += ["--attention", args.attention]
    for item in args.set:
        parts += ["--set", item]
    if args.profile:
        parts += ["--profile", args.profile]
    if args.peer:
        parts += ["--peer", args.peer] + (["--peer-python", args.peer_python] if args.peer_python else [])
    parts += ["--no-safety-checker"] if args.no_safety_checker else []
    parts += ["--few-step", args.few_step] if args.few_step else []
    for name in ("json", "plot", "markdown"):
        if getattr(args, name):
            parts += ["--" + name, getattr(args, name)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench(args) -> int:
    for path in (args.json, args.plot, args.markdown):
        if path:
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                raise InvalidParameter("output path", path, "a path in an existing folder")
    if args.from_json:
        try:
            report = json.loads(Path(args.from_json).read_text())
            report["configs"], report["settings"]  # noqa: B018 (a bench report has both)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidParameter("from-json", args.from_json, f"a JSON file written by fastsd bench --json ({e})")
    else:
        settings = settings_from_args(args)
        report = run_bench(settings, log=lambda line: print(line, file=sys.stderr))
        report["command"] = command_line(args)
    print(format_report(report))
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(report, indent=2, allow_nan=False))
    if args.plot:
        write_plot(report, args.plot)
    if args.markdown:
        write_markdown(report, args.markdown, report["command"])
    if report.get("failed"):
        for f in report["failed"]:
            print(f"fastsd bench: error: {f['config']} {f['reason']}", file=sys.stderr)
        return 1
    return 0
