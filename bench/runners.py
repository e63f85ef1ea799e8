"""The runners `fastsd bench` times: the same five calls (text encoder, VAE encode, UNet step, VAE decode,
safety checker) and a whole generation, over diffusers' pipeline (the baseline), over that pipeline
accelerated in place (the drop-in), or over a fastsd engine (including one over ONNX graphs)."""
from __future__ import annotations

import copy
import tempfile
import time

import torch

from fastsd.accelerate import accelerate, accelerated
from fastsd.backends import lookup_backend
from fastsd.errors import ModelLoadError
from fastsd.optimize import OptimizeConfig, optimize
from fastsd.reference import _load_reference_loras
from fastsd.schedulers import make_scheduler

from .inputs import task_arguments
from .settings import ACCELERATE, PIPELINES, BenchSettings, ConfigSpec, dropin_runner


class DiffusersRunner:
    """The baseline: diffusers' StableDiffusionPipeline (or its Img2Img / Inpaint pipeline for --task) in FP32
    over the model's own modules."""
    unet_calls_per_timing = 1

    def __init__(self, model, settings: BenchSettings):
        self.device = torch.device(settings.device)
        self.task = settings.task
        self.pipe = model.to_pipeline(with_safety_checker=settings.safety_checker, task=settings.task)
        self.pipe.to(self.device, torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self._schedulers = {None: self.pipe.scheduler}  # by name; None: the model's own
        self.pipe.scheduler = self._scheduler(settings.scheduler)
        self.has_safety_checker = self.pipe.safety_checker is not None
        if settings.loras:  # diffusers' own way: PEFT layers beside the weights, not fused
            _load_reference_loras(self.pipe, settings.loras, settings.allow_pickle)

    def _scheduler(self, name: str | None):
        """The pipeline's scheduler for `name` (made once from the model's config, as fastsd.reference does)."""
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._schedulers[None].config)
        return self._schedulers[name]

    @torch.inference_mode()
    def text_encoder(self, ids):
        return self.pipe.text_encoder(ids, attention_mask=None)[0]

    @torch.inference_mode()
    def vae_encode(self, pixels):
        out = self.pipe.vae.encode(pixels, return_dict=False)[0]
        return getattr(out, "parameters", out)  # a tiny VAE's encoder gives the latents themselves

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
        self.pipe.scheduler = self._scheduler(s.scheduler)  # --few-step runs LCM between the run's own calls
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


class CannotRunHere(Exception):
    """A configuration this machine or installation cannot run (a backend package missing, no such device,
    a dtype the backend has no kernels for): skipped with the reason. Anything else that fails is an error."""


def onnx_engine_model(model, settings: BenchSettings, dtype: str, height: int, width: int, backend: str = "onnxruntime"):
    """What the onnxruntime or openvino backend runs: (SDModel over ONNX graphs, export seconds). The graphs
    are the export in --onnx-dir, or one written now by fastsd.export (text encoder, UNet, VAE decoder).
    The PyTorch safety checker is attached so that end to end does the same work as the baseline. Raises
    CannotRunHere when the backend's package is missing; an export that fails raises its own error."""
    try:
        lookup_backend(backend)
        if backend == "openvino":
            # only when openvino is asked for: its runtime is an optional package
            from fastsd.backends.openvino.backend import import_openvino
            import_openvino()
    except (ImportError, ModelLoadError) as e:  # the module or its package missing
        raise CannotRunHere(f"the {backend} backend is not installed ({type(e).__name__}: {first_line(e)})") from None
    try:  # here, not at the top: export_onnx imports the optional onnx package
        from fastsd.export import export_onnx, load_onnx_model
    except ImportError as e:
        raise CannotRunHere(f"fastsd.export is not importable ({first_line(e)})") from None
    t0 = time.perf_counter()
    if settings.onnx_dir:
        onnx_model = load_onnx_model(settings.onnx_dir)
    else:
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


def component_call(runner, comp: str, x: dict):
    return {"text_encoder": lambda: runner.text_encoder(x["ids"]),
            "vae_encode": lambda: runner.vae_encode(x["pixels"]),
            "unet_step": lambda: runner.unet_step(x["sample"], x["t"], x["hidden"]),
            "vae_decode": lambda: runner.vae_decode(x["latents"]),
            # a copy: the checker blacks out flagged images in place
            "safety_checker": lambda: runner.safety_checker(x["image"].clone())}[comp]


def first_line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else ""
