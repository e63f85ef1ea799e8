"""The one entry point to the engine: `optimize(model, OptimizeConfig(...)) -> Engine`.

Defaults are the highest precision and the plainest path (FP32, torch, the model's own attention
maths through SDPA); every speed-up is a flag the user turns on, and `fastsd verify` measures it."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .backends import backend_names, lookup_backend
from .engine import Engine
from .errors import InvalidParameter
from .loading import load_model
from .model import SDModel
from .profiles import profile_flags, resolve_device
from .step_cache import check_interval

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION = ("auto", "sdpa", "math", "triton", "xformers")
SWITCH = ("auto", "on", "off")


@dataclass(frozen=True)
class OptimizeConfig:
    backend: str = "torch"  # torch | onnxruntime | openvino
    device: str = "auto"  # cpu | cuda | cuda:N | auto (CUDA when torch sees one, else the CPU)
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    attention: str = "auto"  # auto | sdpa | math | triton | xformers
    fused_ops: bool = False  # Triton GroupNorm+SiLU, GEGLU, fused QKV where they help
    channels_last: bool = False
    cuda_graphs: bool = False  # CUDA only: UNet step replayed from graphs cached per shape; logged off elsewhere
    # Memory: "auto" slices attention / tiles the VAE decode only when the estimated peak would not fit
    # in free memory (kernels/memory.py); "on" and "off" force it.
    attention_slicing: str = "auto"
    vae_tiling: str = "auto"
    upcast_vae: bool = True  # fp16 runs the VAE in fp32 (it overflows in fp16)
    safety_checker: bool = True
    # dtype="bf16" on the CPU: the measured CPU recipe (README, "CPU fast path"): UNet and VAE with bf16
    # weights in channels_last, the text encoder kept in fp32 (cheap, and its error would reach every step).
    # False: plain bf16 everywhere, as on a GPU.
    cpu_recipe: bool = True
    # torch.compile (inductor) of the UNet; on the CPU with weight freezing. The first call of each shape
    # compiles (minutes on the CPU); later calls are faster.
    compile: bool = False
    # LoRA sets will be switched after the first call (fastsd serve --lora-dir): --compile on the CPU then
    # keeps the weights as graph inputs instead of freezing them, so a switch in place reaches the graph.
    lora_switching: bool = False
    # Step caching (fastsd/step_cache.py, DeepCache-style): every N-th step runs the whole UNet, the steps
    # between only its shallowest layers over the cached deep feature. 1 = off (every step exact).
    cache_interval: int = 1
    # int8 UNet (openvino backend, NNCF post-training quantization; fastsd/backends/openvino/int8.py):
    # off | hybrid (int8 convolutions, int8-weight MatMuls) | full; calibrated on `calibration_prompts`
    # (a text file, one prompt a line; None: the shipped default set).
    int8: str = "off"
    calibration_prompts: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_profile(cls, profile: str = "exact", device: str = "auto", **flags) -> "OptimizeConfig":
        """The flags of a speed profile (fastsd.profiles) on `device`, then `flags` over them."""
        return cls(**{**profile_flags(profile, device), **flags})

    def validated(self) -> "OptimizeConfig":
        if self.device == "auto":  # openvino runs on the CPU whatever else is visible
            return replace(self, device="cpu" if self.backend == "openvino" else resolve_device(self.device)).validated()
        if self.backend not in backend_names():
            raise InvalidParameter("backend", self.backend, ", ".join(backend_names()))
        if self.dtype not in DTYPES:
            raise InvalidParameter("dtype", self.dtype, ", ".join(DTYPES))
        if self.attention not in ATTENTION:
            raise InvalidParameter("attention", self.attention, ", ".join(ATTENTION))
        for name in ("attention_slicing", "vae_tiling"):
            if getattr(self, name) not in SWITCH:
                raise InvalidParameter(name, getattr(self, name), ", ".join(SWITCH))
        check_interval(self.cache_interval)
        if self.cache_interval > 1 and (self.backend != "torch" or self.compile or self.cuda_graphs):
            raise InvalidParameter("cache_interval", self.cache_interval, "1 with --backend "
                                   f"{self.backend}{' and --compile/--cuda-graphs' if self.backend == 'torch' else ''} "
                                   "(step caching runs in the eager torch backend)")
        if self.int8 not in ("off", "hybrid", "full"):
            raise InvalidParameter("int8", self.int8, "off, hybrid, full")
        if self.int8 != "off" and self.backend != "openvino":
            raise InvalidParameter("int8", self.int8, "off with --backend " + self.backend +
                                   " (int8 runs in the openvino backend: --backend openvino)")
        if self.calibration_prompts is not None:
            if self.int8 == "off":
                raise InvalidParameter("calibration_prompts", self.calibration_prompts, "a file only with --int8")
            from .backends.openvino.int8 import read_prompts  # lazy: the openvino backend package only when int8 is asked for
            read_prompts(self.calibration_prompts)
        dev = self.device
        if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InvalidParameter("device", dev, "cpu, cuda or cuda:N")
        if dev.startswith("cuda") and self.backend == "torch":  # onnxruntime checks its own providers
            n = torch.cuda.device_count()
            if n == 0:
                raise InvalidParameter("device", dev, "cpu (no CUDA device is visible here)")
            if ":" in dev and int(dev[5:]) >= n:
                raise InvalidParameter("device", dev, f"cuda:0..cuda:{n - 1}")
        return self


def as_model(model) -> SDModel:
    """An SDModel from an SDModel, a diffusers StableDiffusionPipeline, or a model spec string."""
    if isinstance(model, SDModel):
        return model
    if isinstance(model, str):
        return load_model(model)
    if all(hasattr(model, a) for a in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        extra, fe = {}, getattr(model, "feature_extractor", None)
        if hasattr(model, "low_res_scheduler"):  # StableDiffusionUpscalePipeline
            extra = {"low_res_scheduler": model.low_res_scheduler, "max_noise_level": int(model.config.max_noise_level)}
        if hasattr(model, "depth_estimator"):  # StableDiffusionDepth2ImgPipeline: its processor is DPT's
            extra, fe = {"depth_estimator": model.depth_estimator, "depth_processor": fe}, None
        return SDModel(type(model).__name__, "pipeline", model.tokenizer, model.text_encoder, model.unet,
                       model.vae, model.scheduler, getattr(model, "safety_checker", None), fe, extra=extra)
    raise InvalidParameter("model", type(model).__name__, "an SDModel, a StableDiffusionPipeline or a model name")


def config_from(config: OptimizeConfig | None, profile: str | None, flags: dict,
                what: str = "optimize") -> OptimizeConfig:
    """The config of `optimize(model, config, profile=..., **flags)` (and of `accelerate`), not yet validated:
    `config` or the profile's flags for the device, then `flags` over them."""
    unknown = set(flags) - {f.name for f in fields(OptimizeConfig)}
    if unknown:
        raise InvalidParameter(f"{what} flags", sorted(unknown), ", ".join(f.name for f in fields(OptimizeConfig)))
    flags = dict(flags)
    if profile is not None:
        if config is not None:
            raise InvalidParameter("profile", profile, "either a profile or a config, not both")
        config = OptimizeConfig.from_profile(profile, device=flags.pop("device", "auto"))
    if config is not None and not isinstance(config, OptimizeConfig):
        raise InvalidParameter("config", type(config).__name__, "a fastsd.OptimizeConfig")
    return replace(config or OptimizeConfig(), **flags)


def optimize(model, config: OptimizeConfig | None = None, *, profile: str | None = None, **flags) -> Engine:
    """Build the engine for `model` (its modules are moved and changed in place: the engine owns them).
    `profile` ("exact", "fast", "fastest") picks the flags for the device; `flags` override either."""
    config = config_from(config, profile, flags).validated()
    sd = as_model(model)
    backend = lookup_backend(config.backend)(sd, config)
    return Engine(sd, backend, config)
