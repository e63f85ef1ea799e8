"""The peer in `fastsd bench --peer openvino-genai`: what a CPU user who does not use fastsd runs instead.

Its makers' way, with their defaults: the model folder exported by optimum-intel (`optimum-cli export
openvino --task text-to-image`, no weight-format option), then `openvino_genai.Text2ImagePipeline` over that
export, reshaped to the run's static size and compiled for the CPU with no properties (OpenVINO picks the
precision: bf16 where the CPU has AMX, f32 elsewhere). The export is cached, keyed by the model and the
versions that made it.

optimum-intel 2.2.0 (the newest) pins transformers < 5.6 and huggingface-hub < 1.22, which diffusers 0.42
cannot share an environment with; so the export runs in its own Python environment (`--peer-python`, or
$FASTSD_PEER_PYTHON, or ./.venv-peer made by `make peer-env`), and only openvino-genai runs in fastsd's
process. The image parity is the whole image: GenAI's `TorchGenerator` draws the same initial noise as
torch's CPU generator with the same seed, so the peer's final image is compared with diffusers' FP32 one."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastsd.errors import InvalidParameter
from fastsd.optimize import OptimizeConfig

from .runners import CannotRunHere
from .settings import BenchSettings

PEERS = ("openvino-genai",)
PEER_ENV = ".venv-peer"  # where `make peer-env` puts the export's environment
EXPORT_PACKAGES = ("optimum-intel", "optimum", "openvino", "openvino-tokenizers", "transformers", "diffusers",
                   "huggingface-hub", "torch")


class PeerMissing(CannotRunHere):
    """The peer cannot run here (a package or the export environment missing): skipped with this reason."""


def peer_names(text: str) -> list[str]:
    names = [t.strip() for t in str(text or "").split(",") if t.strip()]
    for name in names:
        if name not in PEERS:
            raise InvalidParameter("peer", name, ", ".join(PEERS))
    return names


def peer_python(explicit: str | None = None) -> str:
    """The interpreter of the export environment: --peer-python, $FASTSD_PEER_PYTHON, ./.venv-peer, else this one."""
    if explicit:
        return explicit
    if os.environ.get("FASTSD_PEER_PYTHON"):
        return os.environ["FASTSD_PEER_PYTHON"]
    local = Path(PEER_ENV) / "bin" / "python"
    return str(local.absolute()) if local.exists() else sys.executable


def check_peer_python(path: str) -> str:
    """--peer-python must name a runnable file (checked before anything is measured)."""
    p = Path(path).expanduser()
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise InvalidParameter("peer-python", path, "the path of a Python interpreter (e.g. .venv-peer/bin/python)")
    return str(p)


def _versions_script() -> str:
    return ("import json\nfrom importlib import metadata\nout = {}\n"
            f"for n in {EXPORT_PACKAGES!r}:\n"
            "    try:\n        out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n"
            "        out[n] = None\nprint(json.dumps(out))\n")


def export_versions(python: str) -> dict:
    """The versions of the export environment's packages (a missing one: None)."""
    try:
        r = subprocess.run([python, "-c", _versions_script()], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise PeerMissing(f"the export environment {python} does not run ({e})") from None
    if r.returncode != 0:
        raise PeerMissing(f"the export environment {python} does not run: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def runtime_version() -> str:
    """openvino-genai in this process (what runs the pipeline), or PeerMissing with the reason."""
    try:
        import openvino_genai  # noqa: F401 (the peer's runtime: an optional package)
        from importlib import metadata
        return metadata.version("openvino-genai")
    except ImportError as e:
        raise PeerMissing(f"openvino-genai is not installed (pip install -e '.[peer]'): {e}") from None


def cache_root() -> Path:
    if os.environ.get("FASTSD_PEER_CACHE"):
        return Path(os.environ["FASTSD_PEER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsd" / "peer"


def _settings(config) -> dict:
    """A module's config without its private entries (diffusers' `_use_default_values` is a list in set order,
    which differs between processes)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_")}


def model_key(model, versions: dict) -> str:
    """What the export depends on: the model (its source, and for random weights the seeded architecture)
    and the export environment's versions. The same in every process."""
    what = {"name": model.name, "source": str(model.source), "versions": versions,
            "configs": {k: _settings(getattr(model, k).config) for k in ("unet", "vae", "text_encoder")
                        if getattr(model, k, None) is not None}}
    src = Path(str(model.source))
    if src.exists():
        what["mtime"] = src.stat().st_mtime
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_for_export(model, folder: Path) -> None:
    """The model as a diffusers folder the export environment's transformers reads: diffusers'
    save_pretrained, with the text encoder's weights named from `text_model.` (transformers 5.23 writes them
    without it, and transformers < 5.6 then loads random weights with only a warning)."""
    from safetensors.torch import load_file, save_file
    model.to_pipeline(with_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    for f in (folder / "text_encoder").glob("*.safetensors"):
        sd = load_file(f)
        if not all(k.startswith("text_model.") for k in sd):
            save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}, f,
                      metadata={"format": "pt"})


def export_folder(model, versions: dict) -> Path:
    """Where the export of `model` by the environment with `versions` is cached."""
    return cache_root() / f"{model.name}-{model_key(model, versions)}"


def is_exported(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / "unet" / "openvino_model.xml").is_file()


def export(load_model, python: str, log=print) -> dict:
    """The optimum-intel export (cached) of the model `load_model()` returns: {"path", "seconds", "cached",
    "versions", "command"}. The model is written as a diffusers folder and dropped before the export runs,
    so that the two processes do not hold a full-size model each."""
    versions = export_versions(python)
    missing = [n for n in ("optimum-intel", "openvino", "openvino-tokenizers") if not versions.get(n)]
    if missing:
        raise PeerMissing(f"{', '.join(missing)} not installed in the export environment {python} "
                          "(make peer-env, or --peer-python)")
    model = load_model()
    folder = export_folder(model, versions)
    command = ["optimum-cli", "export", "openvino", "--model", "MODEL_DIR", "--task", "text-to-image", str(folder)]
    info = {"path": str(folder), "versions": versions, "python": python, "command": " ".join(command)}
    if is_exported(folder):
        return {**info, "seconds": 0.0, "cached": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fastsd-peer-", dir=folder.parent))
    try:
        t0 = time.perf_counter()
        save_for_export(model, tmp / "diffusers")
        name, model = model.name, None
        gc.collect()
        log(f"peer: exporting {name} with optimum-intel {versions['optimum-intel']} into {folder}")
        argv = [python, "-c", "from optimum.commands.optimum_cli import main; main()", "export", "openvino",
                "--model", str(tmp / "diffusers"), "--task", "text-to-image", str(tmp / "ov")]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / "ov" / "unet" / "openvino_model.xml").is_file():
            tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise RuntimeError(f"optimum-cli export openvino failed (exit {r.returncode}): {tail[0][:200]}")
        os.replace(tmp / "ov", folder)
        (folder / "fastsd-export.json").write_text(json.dumps({**info, "log": r.stderr[-4000:]}, indent=1))
        return {**info, "seconds": time.perf_counter() - t0, "cached": False}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ov(x):
    import openvino as ov
    return ov.Tensor(np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x))


class PeerRunner:
    """openvino_genai.Text2ImagePipeline over optimum-intel's export: its text encoder, UNet and VAE decoder
    (GenAI's component classes, reshaped static and compiled for the CPU with its defaults) make the
    pipeline, so the component calls and the whole generation run the same compiled models."""
    unet_calls_per_timing = 1
    has_safety_checker = False  # GenAI's pipeline has no safety checker

    def __init__(self, load_model, settings: BenchSettings, python: str, height: int, width: int, log=print):
        if settings.task != "text2img":
            raise PeerMissing("the peer runs text-to-image only (Text2ImagePipeline)")
        if settings.loras or settings.vae_tiny:
            raise PeerMissing("the peer is measured on the model as exported (no --lora, no --vae-tiny)")
        if tuple(settings.batches) != (1,):
            raise PeerMissing("the peer is measured at --batch 1 (one static shape; its generator draws the noise "
                              "of one image per seed)")
        if settings.scheduler is not None:
            raise PeerMissing("the peer runs the export's own scheduler (no --scheduler)")
        self._prompt, self._negative = settings.prompt, settings.negative
        self.genai_version = runtime_version()
        import openvino as ov
        import openvino_genai as genai
        self.export = export(load_model, python, log)
        self.batch, self.height, self.width, self.guidance = settings.batches[0], height, width, settings.guidance
        d = Path(self.export["path"])
        t0 = time.perf_counter()
        cfg_batch = self.batch * (2 if settings.guidance > 1 else 1)
        self.clip = genai.CLIPTextModel(str(d / "text_encoder")).reshape(cfg_batch)
        self.unet = genai.UNet2DConditionModel(str(d / "unet"))
        self.unet.reshape(cfg_batch, height, width, self.clip.get_config().max_position_embeddings)
        self.vae = genai.AutoencoderKL(str(d / "vae_decoder")).reshape(self.batch, height, width)
        for m in (self.clip, self.unet, self.vae):
            m.compile("CPU")  # its defaults: no properties
        self.scheduler_file = d / "scheduler" / "scheduler_config.json"
        self.pipe = genai.Text2ImagePipeline.stable_diffusion(
            genai.Scheduler.from_config(str(self.scheduler_file)), self.clip, self.unet, self.vae)
        self.compile_s = time.perf_counter() - t0
        self.generator = genai.TorchGenerator
        self.own = []  # the pipeline's own metrics of each end-to-end run
        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # f32 or bf16
        self.capabilities = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        # the tolerance a fastsd configuration of the same precision is held to
        self.config = OptimizeConfig(backend="openvino", dtype="bf16" if self.precision == "bf16" else "fp32")

    def text_encoder(self, ids):  # GenAI's text encoder takes the prompt (it tokenizes): the same work
        return self.clip.infer(self._prompt, self._negative, self.guidance > 1)

    def unet_step(self, sample, t, hidden):
        self.unet.set_hidden_states("encoder_hidden_states", _ov(hidden.float()))
        return self.unet.infer(_ov(sample.float()), _ov(np.asarray(t, dtype=np.int64).reshape(1)))

    def vae_decode(self, latents):  # GenAI's decode: latents -> uint8 image, its post-processing included
        return self.vae.decode(_ov(latents.float()))

    def end_to_end(self, s: BenchSettings, batch: int, height: int, width: int):
        from PIL import Image
        final = {}

        def keep(step, num_steps, latent):
            final["latents"] = torch.from_numpy(np.array(latent.data, copy=True))
            return False  # go on
        out = self.pipe.generate(s.prompt, negative_prompt=s.negative, num_inference_steps=s.steps,
                                 guidance_scale=s.guidance, height=height, width=width, num_images_per_prompt=batch,
                                 generator=self.generator(s.seed), callback=keep)
        m = self.pipe.get_performance_metrics()
        calls = [us / 1e6 for us in m.raw_metrics.unet_inference_durations]
        self.own.append({"generate_s": m.get_generate_duration() / 1e3, "unet_calls_s": calls,
                         "vae_decode_s": m.get_vae_decoder_infer_duration() / 1e3})
        images = [Image.fromarray(a) for a in np.array(out.data)]
        return images, final["latents"].float()

    def own_metrics(self) -> dict:
        """The pipeline's own perf metrics over the timed end-to-end runs: median UNet call, per image."""
        calls = [c for r in self.own for c in r["unet_calls_s"]]
        return {"runs": self.own, "unet_call_median_s": float(np.median(calls)) if calls else None,
                "generate_median_s": float(np.median([r["generate_s"] for r in self.own])) if self.own else None}

    def describe(self) -> dict:
        return {"backend": "openvino-genai (the peer)", "pipeline": "openvino_genai.Text2ImagePipeline",
                "openvino_genai": self.genai_version, "export": self.export["command"],
                "export_versions": self.export["versions"], "export_cached": self.export["cached"],
                "static_shapes": {"batch": self.batch, "height": self.height, "width": self.width,
                                  "guidance": self.guidance},
                "compile": "CPU, no properties (its defaults)", "inference_precision": self.precision,
                "cpu_capabilities": self.capabilities, "compile_s": self.compile_s,
                "generator": "openvino_genai.TorchGenerator (torch's CPU noise for the same seed)"}
