"""The measurements behind `fastsd bench`.

One process, one model, the same inputs for every configuration: the diffusers StableDiffusionPipeline
(FP32, the baseline and the parity reference) runs first, then each fastsd configuration on a fresh copy
of the same modules. Per batch size it times each component (text encoder, one UNet step, VAE decode,
safety checker) and the whole generation, keeps the warm-up calls apart, and compares each
configuration's final images with the baseline's (fastsd.reference.compare)."""
from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

COMPONENTS = ("text_encoder", "unet_step", "vae_decode", "safety_checker")
IMAGE_COMPONENTS = ("text_encoder", "vae_encode", "unet_step", "vae_decode", "safety_checker")  # img2img, inpaint
LABELS = {"text_encoder": "text encoder", "vae_encode": "VAE encode", "unet_step": "UNet step",
          "vae_decode": "VAE decode", "safety_checker": "safety checker", "end_to_end": "end to end"}
PIPELINES = {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
             "inpaint": "StableDiffusionInpaintPipeline"}

BASELINE = "diffusers"
ACCELERATE = "accelerate"  # fastsd.accelerate(pipe): the diffusers pipeline with its modules taken over


def components_for(task: str) -> tuple:
    """What a bench of `task` times: image-to-image and inpainting add the VAE encode."""
    return COMPONENTS if task == "text2img" else IMAGE_COMPONENTS


def dropin_runner(backend: str) -> str | None:
    """The backend a drop-in configuration runs its UNet and VAE decoder on: "accelerate" -> torch,
    "accelerate-openvino" -> openvino (its module runners); None for anything else."""
    if backend == ACCELERATE:
        return "torch"
    if backend.startswith(ACCELERATE + "-"):
        return backend[len(ACCELERATE) + 1:]
    return None


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration to measure: the diffusers baseline, or a fastsd backend, dtype and flags."""
    backend: str  # "diffusers" | a fastsd backend name
    dtype: str = "fp32"
    flags: tuple = ()  # extra OptimizeConfig fields, as sorted (name, value) pairs
    profile: str | None = None  # set when the configuration is what `--profile NAME` picks here

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.flags)
        name = f"{self.backend} {self.dtype}" + (f" [{extra}]" if extra else "")
        return f"profile {self.profile}: {name}" if self.profile else name

    @property
    def is_baseline(self) -> bool:
        return self.backend == BASELINE


@dataclass
class BenchSettings:
    model: str = "tiny"
    random_weights: bool = False
    model_config: str | None = None
    allow_pickle: bool = False
    device: str = "cpu"
    attention: str = "auto"
    configs: list = field(default_factory=list)  # ConfigSpec, baseline first
    batches: tuple = (1,)
    height: int | None = None
    width: int | None = None
    steps: int = 50
    repeat: int = 3
    warmup: int = 1
    e2e_warmup: int = 0
    guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None
    prompt: str = "a red circle on a blue background"
    negative: str = ""
    estimate_steps: int = 50
    safety_checker: bool = True
    threads: int | None = None
    onnx_dir: str | None = None
    progress: bool = True
    loras: tuple = ()  # fastsd.lora.LoraRef: diffusers loads them (load_lora_weights), fastsd fuses them
    task: str = "text2img"  # text2img | img2img | inpaint (fastsd.tasks.TASKS)
    strength: float | None = None  # img2img / inpaint; None: diffusers' default (0.8 / 1.0)
    task_inputs: dict = field(default_factory=dict)  # set by run_bench: task_inputs() at the bench's size


# -- statistics, clocks, memory ---------------------------------------------------------------------
def summarize(runs: list[float]) -> dict:
    """median, min and p90 (linear interpolation) of the timed runs, in seconds."""
    if not runs:
        return {"runs_s": [], "median_s": None, "min_s": None, "p90_s": None}
    return {"runs_s": list(runs), "median_s": statistics.median(runs), "min_s": min(runs),
            "p90_s": float(np.percentile(runs, 90))}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory while a configuration runs: CUDA peak allocation on a GPU, peak resident memory of
    this process on the CPU (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere a
    20 ms sampling thread). `start()` after the configuration is built, `stop()` when its runs end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return
        self._peak = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            if _vm_hwm() is not None:
                self.method = "VmHWM (peak RSS)"
                return
        except OSError:
            pass
        self.method = "RSS sampled every 20 ms"
        self._stop.clear()

        def sample():
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, _rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            _sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            return max(self._peak, _rss())
        return max(_vm_hwm() or 0, _rss())

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _rss()


# -- runners: the same five calls, over diffusers or over a fastsd engine -------------------------------
class DiffusersRunner:
    """The baseline: diffusers' StableDiffusionPipeline (or its Img2Img / Inpaint pipeline for --task) in FP32
    over the model's own modules."""
    unet_calls_per_timing = 1

    def __init__(self, model, settings: BenchSettings):
        from fastsd.schedulers import make_scheduler
        self.device = torch.device(settings.device)
        self.task = settings.task
        self.pipe = model.to_pipeline(with_safety_checker=settings.safety_checker, task=settings.task)
        self.pipe.to(self.device, torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        if settings.scheduler:
            self.pipe.scheduler = make_scheduler(settings.scheduler, self.pipe.scheduler.config)
        self.has_safety_checker = self.pipe.safety_checker is not None
        if settings.loras:  # diffusers' own way: PEFT layers beside the weights, not fused
            from fastsd.reference import _load_reference_loras
            _load_reference_loras(self.pipe, settings.loras, settings.allow_pickle)

    @torch.inference_mode()
    def text_encoder(self, ids):
        return self.pipe.text_encoder(ids, attention_mask=None)[0]

    @torch.inference_mode()
    def vae_encode(self, pixels):
        return self.pipe.vae.encode(pixels, return_dict=False)[0].parameters

    @torch.inference_mode()
    def unet_step(self, sample, t, hidden):
        return self.pipe.unet(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]

    @torch.inference_mode()
    def vae_decode(self, latents):
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    @torch.inference_mode()
    def safety_checker(self, image):
        return self.pipe.run_safety_checker(image, self.device, torch.float32)

    def end_to_end(self, s: BenchSettings, batch: int, height: int, width: int):
        final = {}

        def keep(pipe, i, t, kw):
            final["latents"] = kw["latents"]
            return kw
        # image-to-image takes its size from the image (as fastsd.reference runs it); one image per generated
        # image, so that each is encoded with its own generator as the engine does
        size = {} if self.task == "img2img" else {"height": height, "width": width}
        out = self.pipe(s.prompt, negative_prompt=s.negative or None, num_images_per_prompt=batch,
                        num_inference_steps=s.steps, guidance_scale=s.guidance, **size,
                        **task_arguments(s, batch), output_type="pil",
                        generator=[torch.Generator("cpu").manual_seed(s.seed + i) for i in range(batch)],
                        callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        return out.images, final["latents"].float().cpu()

    def describe(self) -> dict:
        return {"backend": "diffusers", "pipeline": PIPELINES[self.task], "device": str(self.device),
                "dtype": "float32", "attention": "diffusers default (AttnProcessor2_0, SDPA)"}


class AccelerateRunner(DiffusersRunner):
    """The drop-in: diffusers' pipeline, as the baseline builds it, then `fastsd.accelerate(pipe, config)`
    (with a backend's module runners for "accelerate-<backend>"); every call goes through the pipeline's own
    modules, the diffusers way."""

    def __init__(self, model, spec: ConfigSpec, settings: BenchSettings, onnx_dir=None):
        from fastsd.accelerate import accelerate, accelerated
        from fastsd.optimize import OptimizeConfig
        super().__init__(model, settings)
        runner = dropin_runner(spec.backend)
        self.config = OptimizeConfig(backend=runner, device=settings.device, dtype=spec.dtype,
                                     attention=settings.attention, **dict(spec.flags))
        onnx_dir = (settings.onnx_dir or onnx_dir) if runner != "torch" else None
        accelerate(self.pipe, self.config, onnx_dir=onnx_dir)
        self.state = accelerated(self.pipe)

    @torch.inference_mode()
    def safety_checker(self, image):
        return self.pipe.run_safety_checker(image, self.device, self.pipe.text_encoder.dtype)

    def describe(self) -> dict:
        d = self.state.describe()
        out = {"backend": ACCELERATE, "pipeline": type(self.pipe).__name__, "device": d["device"],
               "dtypes": d["dtypes"], "attention": d["attention"], "applied": d["applied"]}
        if d["runners"]:
            out["runners"] = d["runners"]
        return out


class EngineRunner:
    """A fastsd configuration: `fastsd.optimize(model, OptimizeConfig(...))` and its backend's calls."""

    def __init__(self, model, spec: ConfigSpec, settings: BenchSettings):
        from fastsd.optimize import OptimizeConfig, optimize
        config = OptimizeConfig(backend=spec.backend, device=settings.device, dtype=spec.dtype,
                                attention=settings.attention, safety_checker=settings.safety_checker,
                                **dict(spec.flags))
        self.config = config
        self.engine = optimize(model, config)
        if settings.loras:
            self.engine.set_loras(settings.loras, allow_pickle=settings.allow_pickle)
        self.device = self.engine.backend.device
        self.has_safety_checker = self.engine.safety_checker is not None
        # step caching: one timed UNet "step" is a whole cycle (one full call, interval-1 shallow ones),
        # divided by the interval, so the figure is the mean cost of a step in the loop
        self.step_cache = getattr(self.engine.backend, "step_cache", None)
        self.unet_calls_per_timing = self.step_cache.interval if self.step_cache else 1

    def text_encoder(self, ids):
        return self.engine.backend.encode_text(ids)

    def vae_encode(self, pixels):
        return self.engine.backend.encode_image(pixels)

    def unet_step(self, sample, t, hidden):
        if self.step_cache is None:
            return self.engine.backend.unet(sample, t, hidden)
        self.step_cache.reset()
        for _ in range(self.step_cache.interval):
            out = self.engine.backend.unet(sample, t, hidden)
        return out

    def vae_decode(self, latents):
        return self.engine.backend.decode(latents)

    @torch.inference_mode()
    def safety_checker(self, image):
        # what Engine.generate does after the decode: a CPU fp32 copy, then the checker
        return self.engine._safety_check(image.float().cpu().clone())

    def end_to_end(self, s: BenchSettings, batch: int, height: int, width: int):
        r = self.engine.generate(s.prompt, s.negative or None, num_images_per_prompt=batch,
                                 num_inference_steps=s.steps, guidance_scale=s.guidance, height=height,
                                 width=width, seed=[s.seed + i for i in range(batch)], scheduler=s.scheduler,
                                 progress=False, **task_arguments(s, batch))
        return r.images, r.latents

    def describe(self) -> dict:
        return self.engine.describe()


# -- inputs ------------------------------------------------------------------------------------------
def unet_calls(model, steps: int, scheduler: str | None, task: str = "text2img",
               strength: float | None = None) -> tuple[int, str, object]:
    """How many UNet calls `steps` denoising steps make (PNDM makes steps + 1; image-to-image and
    inpainting start later, at the step `strength` picks), the scheduler's name, and the timestep in the
    middle of the schedule."""
    from fastsd.schedulers import make_scheduler, scheduler_name
    from fastsd.tasks import ImageToImage
    sched = make_scheduler(scheduler, model.scheduler.config) if scheduler else \
        type(model.scheduler).from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    if task != "text2img":  # the engine's own start step (diffusers' get_timesteps), on this copy of the scheduler
        ts = ImageToImage(None, strength, 1.0).start_timesteps(sched, steps)
    return len(ts), scheduler_name(sched), ts[len(ts) // 2]


def task_inputs(model, task: str, strength, height: int, width: int) -> dict:
    """The image task's inputs, the same for every configuration: verify's drawn image (a red disc on blue)
    and mask (the top-left quarter) at the bench's size, and the strength; {} for text-to-image. A task
    this model cannot run is an InvalidParameter naming it."""
    from fastsd import tasks
    from fastsd.errors import InvalidParameter
    from fastsd.verify import sample_inputs
    if task not in tasks.TASKS:
        raise InvalidParameter("task", task, ", ".join(tasks.TASKS))
    channels = model.unet.config.in_channels
    if channels == 9 and task != "inpaint":
        raise InvalidParameter("task", task, "inpaint: this model has a 9-channel inpainting UNet, which "
                               "text-to-image and image-to-image pipelines cannot run")
    if task == "text2img":
        if strength is not None:
            raise InvalidParameter("strength", strength, "only with --task img2img or inpaint")
        return {}
    image, mask = sample_inputs(task, height, width)
    strength = tasks.strength_value(strength, task == "inpaint")
    tasks.check_inputs(image, mask, strength, channels)
    return {"image": image, "mask_image": mask, "strength": strength}


def task_arguments(s: BenchSettings, batch: int) -> dict:
    """The image / mask / strength arguments of one end-to-end call (both runners take the same), one image
    per generated image."""
    if not s.task_inputs:
        return {}
    x = s.task_inputs
    out = {"image": [x["image"]] * batch, "strength": x["strength"]}
    if x["mask_image"] is not None:
        out["mask_image"] = [x["mask_image"]] * batch
    return out


def vae_encodes(task: str, nine_channels: bool, strength: float | None, baseline: bool) -> int:
    """VAE encodes per generation: the image (image-to-image; inpainting on a 4-channel UNet, or below full
    strength) and the masked image (inpainting: diffusers always encodes it; fastsd only for a 9-channel UNet,
    the one that reads it)."""
    if task == "text2img":
        return 0
    if task == "img2img":
        return 1
    image = 1 if not nine_channels or strength < 1.0 else 0
    return image + (1 if baseline or nine_channels else 0)


def make_inputs(model, s: BenchSettings, batch: int, height: int, width: int, device) -> tuple[dict, dict]:
    """Seeded inputs of one batch size, the same for every configuration, and their shapes."""
    cfg = s.guidance > 1.0 and model.unet.config.time_cond_proj_dim is None
    n_text = 2 * batch if cfg else batch
    tok = model.tokenizer
    texts = ([s.negative] * batch if cfg else []) + [s.prompt] * batch
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    g = torch.Generator("cpu").manual_seed(s.seed)
    f = model.vae_scale_factor
    lat = (model.unet.config.in_channels, height // f, width // f)
    _, _, t = unet_calls(model, s.steps, s.scheduler)
    inputs = {
        "ids": ids,
        "sample": torch.randn((n_text, *lat), generator=g),
        "t": t,
        "hidden": torch.randn((n_text, ids.shape[1], model.unet.config.cross_attention_dim), generator=g),
        "latents": torch.randn((batch, model.vae.config.latent_channels, *lat[1:]), generator=g),
        "image": torch.rand((batch, 3, height, width), generator=g) * 2 - 1,
    }
    if s.task_inputs:  # the VAE encoder's input: the task's image, as the pipelines preprocess it, per image
        pixels = torch.from_numpy(np.asarray(s.task_inputs["image"].convert("RGB"), dtype=np.float32))
        inputs["pixels"] = (pixels.permute(2, 0, 1) / 127.5 - 1.0).unsqueeze(0).repeat(batch, 1, 1, 1)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "t" else v) for k, v in inputs.items()}
    shapes = {
        "images_per_call": batch, "guidance_batched": cfg,
        "text_encoder": {"input_ids": list(ids.shape)},
        "unet_step": {"sample": list(inputs["sample"].shape), "encoder_hidden_states": list(inputs["hidden"].shape),
                      "timestep": int(t)},
        "vae_decode": {"latents": list(inputs["latents"].shape), "image": [batch, 3, height, width]},
        "safety_checker": {"image": [batch, 3, height, width]},
        "end_to_end": {"prompts": 1, "images": batch, "steps": s.steps, "height": height, "width": width},
    }
    if s.task_inputs:
        shapes["vae_encode"] = {"image": [batch, 3, height, width],
                                "latent_parameters": [batch, 2 * model.vae.config.latent_channels, *lat[1:]]}
        shapes["end_to_end"].update(task=s.task, strength=s.task_inputs["strength"],
                                    mask=s.task_inputs["mask_image"] is not None)
    return inputs, shapes


# -- ONNX: included only when the backend (and an export) exist ------------------------------------------
class CannotRunHere(Exception):
    """A configuration this machine or installation cannot run (a backend package missing, no such device,
    a dtype the backend has no kernels for): skipped with the reason. Anything else that fails is an error."""


def onnx_engine_model(model, settings: BenchSettings, dtype: str, height: int, width: int, backend: str = "onnxruntime"):
    """What the onnxruntime or openvino backend runs: (SDModel over ONNX graphs, export seconds). The graphs
    are the export in --onnx-dir, or one written now by fastsd.export (text encoder, UNet, VAE decoder).
    The PyTorch safety checker is attached so that end to end does the same work as the baseline. Raises
    CannotRunHere when the backend's package is missing; an export that fails raises its own error."""
    from fastsd.backends import lookup_backend
    from fastsd.errors import ModelLoadError
    try:
        lookup_backend(backend)
        if backend == "openvino":
            from fastsd.backends.openvino.backend import import_openvino
            import_openvino()
    except (ImportError, ModelLoadError) as e:  # the module or its package missing
        raise CannotRunHere(f"the {backend} backend is not installed ({type(e).__name__}: {_line(e)})") from None
    try:
        from fastsd.export import export_onnx, load_onnx_model
    except ImportError as e:
        raise CannotRunHere(f"fastsd.export is not importable ({_line(e)})") from None
    t0 = time.perf_counter()
    if settings.onnx_dir:
        onnx_model = load_onnx_model(settings.onnx_dir)
    else:
        import tempfile
        folder = tempfile.mkdtemp(prefix=f"fastsd-bench-onnx-{dtype}-")
        batch = f"1:{min(settings.batches)}:{max(4, max(settings.batches))}"
        # no per-graph parity pass (it runs the UNet twice more): the bench compares every configuration's
        # final images with the baseline's anyway
        graphs = ("text_encoder", "unet", "vae_decoder") + (("vae_encoder",) if settings.task != "text2img" else ())
        options = {"dtype": dtype, "batch": batch, "components": graphs, "check": False}
        if height == width:
            options["resolution"] = f"{height}:{height}:{height}"
        export_onnx(copy.deepcopy(model), folder, **options)
        onnx_model = load_onnx_model(folder)
        onnx_model.extra["bench_temp"] = folder  # removed when the run ends
    if getattr(onnx_model, "safety_checker", None) is None and model.safety_checker is not None:
        onnx_model.safety_checker = copy.deepcopy(model.safety_checker)
        onnx_model.feature_extractor = model.feature_extractor
    return onnx_model, time.perf_counter() - t0


def _component_call(runner, comp: str, x: dict):
    return {"text_encoder": lambda: runner.text_encoder(x["ids"]),
            "vae_encode": lambda: runner.vae_encode(x["pixels"]),
            "unet_step": lambda: runner.unet_step(x["sample"], x["t"], x["hidden"]),
            "vae_decode": lambda: runner.vae_decode(x["latents"]),
            # a copy: the checker blacks out flagged images in place
            "safety_checker": lambda: runner.safety_checker(x["image"].clone())}[comp]


def _unsupported_here(e: BaseException, spec) -> bool:
    """An error that says this machine or backend cannot run the configuration at all (no such device, a
    dtype the backend has no kernels for, a package missing), as opposed to one that broke."""
    from fastsd.errors import InvalidParameter, ModelLoadError
    if isinstance(e, InvalidParameter) and getattr(e, "name", None) in ("device", "dtype"):
        return True
    return isinstance(e, ModelLoadError) and "not installed" in str(e)


# a whole run this far from the sum of its parts means one of the figures is not to be trusted
CONSISTENCY_RANGE = (0.67, 1.5)


def consistency(row: dict, unet_calls: int, text_in_e2e: bool, vae_encodes: int = 0) -> dict:
    """The measured end-to-end median against the sum of the component medians for the same run (text
    encoder only where the end-to-end run encodes every time: the engine caches prompt embeddings)."""
    c = row["components"]
    parts = [c[k].get("median_s") or 0.0 for k in (("text_encoder",) if text_in_e2e else ()) + ("vae_decode", "safety_checker")]
    expected = sum(parts) + unet_calls * c["unet_step"]["median_s"]
    if vae_encodes:
        expected += vae_encodes * c["vae_encode"]["median_s"]
    ratio = row["end_to_end"]["median_s"] / expected if expected else None
    ok = ratio is not None and CONSISTENCY_RANGE[0] <= ratio <= CONSISTENCY_RANGE[1]
    note = (f"end to end {row['end_to_end']['median_s']:.2f} s vs {expected:.2f} s from its components "
            f"(ratio {ratio:.2f}): " + ("consistent" if ok else "the component and whole-run figures disagree "
                                        "(load from other processes?); do not trust this row's ratios"))
    return {"expected_s": expected, "ratio": ratio, "ok": ok, "note": note}


def _line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else ""


def _dropin_ratios(results: list) -> None:
    """Beside each drop-in (accelerate) configuration: its ratio to fastsd's engine on the same backend
    (torch for "accelerate", openvino for "accelerate-openvino") with the same dtype and flags, measured in
    the same run (engine median / drop-in median; below 1: the drop-in is slower)."""
    engines = {(e["backend"], e["dtype"], tuple(sorted(e["flags"].items()))): e for e in results
               if not e["baseline"] and dropin_runner(e["backend"]) is None}
    for entry in results:
        runner = dropin_runner(entry["backend"])
        eng = engines.get((runner, entry["dtype"], tuple(sorted(entry["flags"].items()))))
        if runner is None or eng is None:
            continue
        entry["vs_engine"] = {"engine": eng["name"], "batches": {}}
        for b, row in entry["batches"].items():
            erow = eng["batches"].get(b)
            if erow is None:
                continue
            pairs = [(comp, erow["components"][comp], st) for comp, st in row["components"].items()] + \
                [("end_to_end", erow["end_to_end"], row["end_to_end"])]
            entry["vs_engine"]["batches"][b] = {comp: es["median_s"] / st["median_s"] for comp, es, st in pairs
                                                if es.get("median_s") and st.get("median_s")}


# -- machine and versions ----------------------------------------------------------------------------
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
          "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def machine_info(device: torch.device) -> dict:
    import platform
    import re
    import psutil
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        have = set(m.group(1).split()) if m else set()
        flags = [f for f in _FLAGS if f in have]
    except OSError:
        pass
    onednn = re.search(r"(?:MKL-DNN|oneDNN)\s*v?([\d.]+)", torch.__config__.show())
    info = {
        "cpu": cpu, "cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "onednn": onednn.group(1) if onednn else None, "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "amx": "amx_bf16" in flags,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    import platform
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "openvino", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import fastsd
    out["fastsd"] = fastsd.__version__
    return out


# -- the run -----------------------------------------------------------------------------------------
def _finite(x):
    """JSON has no inf: PSNR of identical images is written as the string "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class _Progress:
    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, disable=not enabled, unit="call", file=sys.stderr, leave=False,
                        dynamic_ncols=True)

    def step(self, what: str):
        self.bar.set_description_str(what, refresh=True)

    def done(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def _timed(fn, device, cpu: list | None = None) -> float:
    """Wall seconds of one call; its process CPU seconds (all threads) go to `cpu`."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return wall


def run_bench(settings: BenchSettings, model=None, log=print) -> dict:
    """Measure every configuration in `settings.configs` (baseline first) and return the report dict
    (what --json writes). `model` is an SDModel; loaded from `settings.model` when None. `log` gets the
    one-line notes (skipped configurations)."""
    from fastsd.loading import load_model
    from fastsd.reference import compare, tolerance_for
    from fastsd import validation as check

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    started = time.time()
    load_avg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    given = model
    mem = PeakMemory(device)
    base_memory = mem.current()  # the process before any model is loaded

    def fresh_model():
        """A pristine copy for the next configuration (optimize changes modules in place). Loaded again
        rather than deep-copied from one kept in memory: one full-size model resident at a time (random
        weights are seeded, so every load is the same model)."""
        if given is not None:
            return copy.deepcopy(given)
        return load_model(settings.model, random_weights=settings.random_weights, allow_pickle=settings.allow_pickle,
                          config=settings.model_config, safety_checker=settings.safety_checker)
    model = fresh_model()
    load_s = time.perf_counter() - t0
    model_info = {"name": model.name, "spec": settings.model, "source": model.source,
                  "random_weights": model.source == "random",
                  "parameters": {k: int(v) for k, v in model.parameter_counts().items()}, "load_s": load_s,
                  "unet_in_channels": int(model.unet.config.in_channels)}
    model_has_safety = model.safety_checker is not None
    height = check.size("height", settings.height or model.native_size)
    width = check.size("width", settings.width or model.native_size)
    settings = replace(settings, task_inputs=task_inputs(model, settings.task, settings.strength, height, width))
    strength = settings.task_inputs.get("strength")
    n_calls, sched_name, _ = unet_calls(model, settings.steps, settings.scheduler, settings.task, strength)
    est_calls, _, _ = unet_calls(model, settings.estimate_steps, settings.scheduler, settings.task, strength)
    has_safety = settings.safety_checker and model.safety_checker is not None
    all_comps = components_for(settings.task)
    nine = model.unet.config.in_channels == 9
    encodes = {base: vae_encodes(settings.task, nine, strength, base) for base in (True, False)}

    configs = list(settings.configs)
    if not configs or not configs[0].is_baseline:
        configs = [ConfigSpec(BASELINE)] + [c for c in configs if not c.is_baseline]
    skipped, failed, onnx_models = [], [], {}
    reference = {}  # batch -> (images, latents) of the baseline's end-to-end run
    results = []

    def cannot_run(spec, reason):
        skipped.append({"config": spec.name, "reason": reason})
        log(f"skipped {spec.name}: {reason}")

    def fail(spec, e, when):
        reason = f"failed {when}: {type(e).__name__}: {_line(e)}"
        failed.append({"config": spec.name, "reason": reason})
        log(f"FAILED {spec.name}: {reason}")

    comps = [c for c in all_comps if c != "safety_checker" or has_safety]
    per_batch = len(comps) * (settings.warmup + settings.repeat) + settings.e2e_warmup + settings.repeat
    progress = _Progress(len(configs) * (1 + len(settings.batches) * per_batch), settings.progress)
    inputs, shapes = {}, {}
    for b in settings.batches:
        inputs[b], shapes[str(b)] = make_inputs(model, settings, b, height, width, device)

    # 1. build every configuration (each on its own copy of the model), so that their repeats can be
    # interleaved: load from other processes then hits every configuration alike
    built = []  # (spec, entry, runner)
    for spec in configs:
        gc.collect()
        entry = {"name": spec.name, "backend": spec.backend, "dtype": spec.dtype, "flags": dict(spec.flags),
                 "profile": spec.profile, "baseline": spec.is_baseline, "batches": {}}
        progress.step(f"{spec.name}: loading and building")
        before = mem.current()
        try:
            if spec.backend in ("onnxruntime", "openvino"):
                export_dtype = spec.dtype if spec.backend == "onnxruntime" else "fp32"  # openvino picks its own
                if export_dtype not in onnx_models:
                    onnx_models[export_dtype] = onnx_engine_model(model if model is not None else fresh_model(),
                                                                  settings, export_dtype, height, width, spec.backend)
                    entry["export_s"] = onnx_models[export_dtype][1]
                t0 = time.perf_counter()
                runner = EngineRunner(onnx_models[export_dtype][0], spec, settings)
            else:
                if model is None:
                    t0 = time.perf_counter()
                    model = fresh_model()
                    entry["load_s"] = time.perf_counter() - t0
                    before = mem.current()
                t0 = time.perf_counter()
                m, model = model, None  # the runner owns it now
                if dropin_runner(spec.backend):
                    # a drop-in over graphs runs the export this run made for that backend's engine, if any,
                    # rather than exporting the same model again (minutes at SD size)
                    made = onnx_models.get(spec.dtype if dropin_runner(spec.backend) == "onnxruntime" else "fp32")
                    runner = AccelerateRunner(m, spec, settings, onnx_dir=made[0].path if made else None)
                else:
                    runner = DiffusersRunner(m, settings) if spec.is_baseline else EngineRunner(m, spec, settings)
                del m
            entry["build_s"] = time.perf_counter() - t0
        except CannotRunHere as e:
            cannot_run(spec, str(e))
            progress.done(1 + len(settings.batches) * per_batch)
            continue
        except Exception as e:
            if spec.is_baseline:
                raise
            if _unsupported_here(e, spec):
                cannot_run(spec, f"{type(e).__name__}: {_line(e)}")
            else:
                fail(spec, e, "to build")
            progress.done(1 + len(settings.batches) * per_batch)
            continue
        progress.done()
        entry["describe"] = runner.describe()
        entry["memory_after_build_mb"] = mem.current() / 2**20
        entry["resident_mb"] = (mem.current() - before) / 2**20
        entry["load_average"] = {"built": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        built.append((spec, entry, runner))
    mem.start()

    # 2. per batch: warm-ups, then every repeat of a component across all configurations in turn
    for b in settings.batches:
        x = inputs[b]
        for spec, entry, runner in built:
            entry["batches"][str(b)] = {"components": {}}
        for comp in all_comps:
            for spec, entry, runner in list(built):
                row = entry["batches"][str(b)]
                if comp not in comps or (comp == "safety_checker" and not runner.has_safety_checker):
                    row["components"][comp] = {"skipped": "the model has no safety checker"
                                               if not model_has_safety else "this configuration runs no safety checker"}
            active = [t for t in built if "skipped" not in t[1]["batches"][str(b)]["components"].get(comp, {})]
            timings = {id(r): ([], [], []) for _, _, r in active}  # warm-up, runs, cpu
            for i in range(settings.warmup + settings.repeat):
                for spec, entry, runner in list(active):
                    warm, runs, cpu = timings[id(runner)]
                    is_warm = i < settings.warmup
                    progress.step(f"{spec.name} batch {b}: {LABELS[comp]} "
                                  + (f"warm-up {i + 1}/{settings.warmup}" if is_warm else
                                     f"{i - settings.warmup + 1}/{settings.repeat}"))
                    call = _component_call(runner, comp, x)
                    per = runner.unet_calls_per_timing if comp == "unet_step" else 1
                    try:
                        c = []
                        wall = _timed(call, device, c) / per
                    except Exception as e:
                        if spec.is_baseline:
                            raise
                        fail(spec, e, f"while measuring {LABELS[comp]}")
                        active.remove((spec, entry, runner))
                        built.remove((spec, entry, runner))
                        progress.done((settings.warmup + settings.repeat - i) * 1)
                        continue
                    (warm if is_warm else runs).append(wall)
                    if not is_warm:
                        cpu.append(c[0] / per)
                    progress.done()
            for spec, entry, runner in active:
                warm, runs, cpu = timings[id(runner)]
                entry["batches"][str(b)]["components"][comp] = {
                    **summarize(runs), "warmup_s": warm, "cpu_s": cpu, "cpu_median_s": statistics.median(cpu)}
        # end to end, interleaved the same way
        e2e = {id(r): ([], [], [], []) for _, _, r in built}  # warm-up, runs, cpu, outputs
        for i in range(settings.e2e_warmup + settings.repeat):
            for spec, entry, runner in list(built):
                warm, runs, cpu, outs = e2e[id(runner)]
                is_warm = i < settings.e2e_warmup
                progress.step(f"{spec.name} batch {b}: end to end ({settings.steps} steps) "
                              f"{i + 1}/{settings.e2e_warmup + settings.repeat}")
                try:
                    wall = _timed(lambda: outs.append(runner.end_to_end(settings, b, height, width)), device,
                                  None if is_warm else cpu)
                except Exception as e:
                    if spec.is_baseline:
                        raise
                    fail(spec, e, "while measuring end to end")
                    built.remove((spec, entry, runner))
                    continue
                (warm if is_warm else runs).append(wall)
                progress.done()
        for spec, entry, runner in built:
            warm, runs, cpu, outs = e2e[id(runner)]
            row = entry["batches"][str(b)]
            row["end_to_end"] = {**summarize(runs), "warmup_s": warm, "steps": settings.steps,
                                 "unet_calls": n_calls, "cpu_s": cpu, "cpu_median_s": statistics.median(cpu)}
            med = row["end_to_end"]["median_s"]
            row["images_per_s"] = b / med if med else None
            c = row["components"]
            parts = [c[k].get("median_s") or 0.0 for k in ("text_encoder", "vae_decode", "safety_checker")]
            n_enc = encodes[spec.is_baseline]
            if n_enc:
                parts.append(n_enc * c["vae_encode"]["median_s"])
            row["end_to_end_estimate"] = {
                "steps": settings.estimate_steps, "unet_calls": est_calls, "vae_encodes": n_enc,
                "seconds": sum(parts) + est_calls * c["unet_step"]["median_s"],
                "how": "text encoder + vae_encodes x VAE encode + unet_calls x UNet step + VAE decode + safety "
                       "checker (medians)" if n_enc else
                       "text encoder + unet_calls x UNet step + VAE decode + safety checker (medians)"}
            row["consistency"] = consistency(row, n_calls, text_in_e2e=spec.is_baseline, vae_encodes=n_enc)
            if not row["consistency"]["ok"]:
                log(f"WARNING {spec.name} batch {b}: {row['consistency']['note']}")
            images, latents = outs[-1]
            if spec.is_baseline:
                reference[b] = (images, latents)
                row["parity"] = {"reference": True}
            else:
                ref_images, ref_latents = reference[b]
                tol = tolerance_for(runner.config)  # the configuration verify would hold it to
                seeds = [settings.seed + i for i in range(b)]
                rows = compare(ref_images, images, ref_latents, latents, [settings.prompt] * b, seeds, tol)
                row["parity"] = {"psnr_db": min(r.psnr_db for r in rows),
                                 "latent_cosine": min(r.latent_cosine for r in rows),
                                 "max_abs": max(r.max_abs for r in rows),
                                 "passed": all(r.passed for r in rows), "tolerance": asdict(tol),
                                 "images": [asdict(r) for r in rows]}
    peak = mem.stop()
    for spec, entry, runner in built:
        entry["peak_memory"] = {"kind": "cuda" if device.type == "cuda" else "cpu", "method": mem.method,
                                "peak_mb": peak / 2**20, "resident_mb": entry["resident_mb"],
                                "process_without_model_mb": base_memory / 2**20,
                                "config_peak_mb": entry["resident_mb"]}
        entry["load_average"]["done"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        results.append(entry)
    del built
    gc.collect()
    import shutil
    for onnx_model, _ in onnx_models.values():
        if onnx_model.extra.get("bench_temp"):
            shutil.rmtree(onnx_model.extra["bench_temp"], ignore_errors=True)
    progress.close()

    base = results[0]
    for entry in results:
        for b, row in entry["batches"].items():
            brow = base["batches"][b]
            for stats, bs in [(st, brow["components"][comp]) for comp, st in row["components"].items()] + \
                    [(row["end_to_end"], brow["end_to_end"])]:
                if stats.get("median_s") and bs.get("median_s"):
                    stats["speedup"] = bs["median_s"] / stats["median_s"]
                    stats["cpu_speedup"] = bs["cpu_median_s"] / stats["cpu_median_s"]
            row["end_to_end_estimate"]["speedup"] = (brow["end_to_end_estimate"]["seconds"]
                                                     / row["end_to_end_estimate"]["seconds"])
    _dropin_ratios(results)
    machine = machine_info(device)
    machine["load_average_start"], machine["load_average_end"] = load_avg_start, machine.pop("load_average")
    return _finite({
        "fastsd_bench": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "model": model_info,
        "settings": {"height": height, "width": width, "steps": settings.steps, "unet_calls": n_calls,
                     "scheduler": sched_name, "guidance": settings.guidance, "batches": list(settings.batches),
                     "repeat": settings.repeat, "warmup": settings.warmup, "e2e_warmup": settings.e2e_warmup,
                     "seed": settings.seed, "prompt": settings.prompt, "negative": settings.negative,
                     "estimate_steps": settings.estimate_steps, "estimate_unet_calls": est_calls,
                     "device": settings.device, "attention": settings.attention,
                     "safety_checker": has_safety, "task": settings.task, "strength": strength,
                     "pipeline": PIPELINES[settings.task], "components": list(all_comps),
                     "mask": "top-left quarter" if settings.task == "inpaint" else None,
                     "unet_in_channels": model_info["unet_in_channels"]},
        "machine": machine,
        "versions": versions(),
        "shapes": shapes,
        "skipped": skipped,
        "failed": failed,
        "configs": results,
        "notes": ["speedup = baseline median / configuration median (above 1 is faster than diffusers)",
                  "parity: the configuration's final images against the baseline's (FP32 diffusers, same "
                  "prompt and seeds), fastsd.reference.compare at the configuration dtype's tolerance",
                  "end-to-end runs follow the component warm-ups (same shapes); e2e_warmup more are excluded",
                  "peak memory: peak_mb = peak RSS of the process during the configuration's runs (one model "
                  "resident at a time), or CUDA max_memory_allocated on a GPU; config_peak_mb = peak_mb minus "
                  "the process's RSS before any model was loaded (on the CPU)",
                  "end to end: the fastsd engine caches prompt embeddings, so its repeated runs skip the text "
                  "encoder (about 0.2 s for SD 1.x on this CPU); the diffusers pipeline encodes every time",
                  "cpu_s: process CPU seconds per call, all threads together; on a shared machine wall time "
                  "grows with other load, CPU time much less (cpu_speedup compares those)"],
    })
