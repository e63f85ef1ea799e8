"""What `fastsd bench` measures: the components it times, the configurations (`ConfigSpec`) and the
run's settings (`BenchSettings`)."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    vae_tiny: str | None = None  # an AutoencoderTiny folder in place of the model's VAE (every configuration)
    peer_python: str | None = None  # the optimum-intel export's interpreter (bench/peer.py)
    # "SCHEDULER,STEPS,GUIDANCE" (e.g. "lcm,4,1"): also time that recipe per configuration (bench/fewstep.py)
    few_step: str | None = None
