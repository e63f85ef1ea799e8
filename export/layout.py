"""The export folder: what it holds, how it is written, and how it is read back as an SDModel.

    DIR/model_index.json          StableDiffusionPipeline + OnnxRuntimeModel entries (Optimum and
                                  diffusers' OnnxStableDiffusionPipeline both load it)
    DIR/scheduler/                scheduler_config.json
    DIR/tokenizer/                vocab.json, merges.txt, tokenizer.json, tokenizer_config.json
    DIR/<graph>/model.onnx        graph; model.onnx.data beside it when over 2 GB; config.json
    DIR/<graph>/model.gpu.onnx    with --optimize: the fully fused variant for CUDA/TensorRT providers
    DIR/trt_profiles.json         min/opt/max shape per input of each graph
    DIR/BUILD_TENSORRT.md         trtexec command lines using those profiles
    DIR/fastsd_export.json        what it was exported from and how; parity per graph (written last)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from .errors import NotAnExport
from .graphs import COMPONENTS
from .writer import write_json, write_text

log = logging.getLogger("fastsd")

EXPORT_INFO = "fastsd_export.json"
GRAPH = "model.onnx"
GPU_GRAPH = "model.gpu.onnx"
# the files and folders an export writes (what --overwrite replaces; nothing else in DIR is touched)
EXPORT_ENTRIES = (*COMPONENTS, "tokenizer", "scheduler", "low_res_scheduler", "model_index.json", "trt_profiles.json",
                  "BUILD_TENSORRT.md", EXPORT_INFO)


# -- writing -------------------------------------------------------------------------------------------
def model_index(model, components) -> dict:
    import diffusers
    onnx_entry = ["diffusers", "OnnxRuntimeModel"]
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(model.scheduler).__name__],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    for comp in COMPONENTS:
        index[comp] = onnx_entry if comp in components else [None, None]
    if model.extra.get("low_res_scheduler") is not None:  # the x4 upscaler (its UNet graph takes class_labels)
        index["low_res_scheduler"] = ["diffusers", type(model.extra["low_res_scheduler"]).__name__]
        index["max_noise_level"] = int(model.extra.get("max_noise_level", 350))
    return index


def component_config(model, comp: str) -> dict:
    """config.json beside a graph: the module's own config (Optimum reads num_hidden_layers for the text
    encoder; in_channels, sample_size, time_cond_proj_dim for the UNet; block_out_channels and
    scaling_factor for the VAE parts)."""
    import diffusers
    if comp == "text_encoder":
        return model.text_encoder.config.to_dict()
    module = model.unet if comp == "unet" else model.vae
    cfg = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    return {"_class_name": type(module).__name__, "_diffusers_version": diffusers.__version__, **cfg}


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus vocab.json and merges.txt: transformers 5 writes tokenizer.json only, which
    the transformers-4 stack (Optimum) cannot read."""
    tokenizer.save_pretrained(str(folder))
    tj = folder / "tokenizer.json"
    if tj.is_file() and not (folder / "vocab.json").is_file():
        bpe = json.loads(tj.read_text())["model"]
        write_text(folder / "vocab.json", json.dumps(bpe["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        write_text(folder / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")


def save_scheduler(scheduler, folder: Path) -> None:
    """save_pretrained, minus the keys the scheduler took by default: diffusers remembers those
    (`_use_default_values`) and lets another scheduler class built from this config (`--scheduler euler`)
    use its own defaults for them (e.g. timestep_spacing); written out, they would override them."""
    scheduler.save_pretrained(str(folder))
    defaults = set(scheduler.config.get("_use_default_values") or ())
    if defaults:
        f = folder / "scheduler_config.json"
        cfg = json.loads(f.read_text())
        write_text(f, json.dumps({k: v for k, v in cfg.items() if k not in defaults}, indent=2) + "\n")


def write_config(model, comp: str, folder: Path) -> None:
    write_json(folder / "config.json", component_config(model, comp))


# -- reading -------------------------------------------------------------------------------------------
class OnnxGraph:
    """Stands where a torch module stands in an SDModel: the engine reads only `.config` from it."""

    def __init__(self, name: str, config: dict, paths: dict[str, Path]):
        self.name = name
        self.config = SimpleNamespace(**config)
        self.paths = paths  # {"text_encoder": {"cpu": Path, "gpu": Path|None}, ...}

    def parameters(self):
        return iter(())

    def __repr__(self):
        return f"OnnxGraph({self.name}: {', '.join(str(p['cpu']) for p in self.paths.values())})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NotAnExport(f"model: cannot read {path}: {e}") from None


def missing_entries(folder: Path) -> list[str]:
    need = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.onnx", "unet/model.onnx",
            "unet/config.json", "vae_decoder/model.onnx", "vae_decoder/config.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    tok = folder / "tokenizer"
    if not ((tok / "vocab.json").is_file() or (tok / "tokenizer.json").is_file()):
        missing.append("tokenizer/vocab.json (or tokenizer.json)")
    return missing


def load_onnx_model(folder):
    """An SDModel over an ONNX export folder (fastsd's, or Optimum's): tokenizer and scheduler loaded;
    text_encoder, unet and vae replaced by OnnxGraph objects carrying `.config` and the graph paths
    (model.extra["onnx"]); no torch weights. The onnxruntime backend runs it."""
    from fastsd.model import SDModel  # lazy: keeps diffusers out of `import fastsd.export`
    spec = str(folder)
    path = Path(spec).expanduser()
    hint = "write one with `fastsd export --model MODEL --out DIR`"
    if not path.is_dir():
        raise NotAnExport(f"model: {spec!r} is not an ONNX export folder (no such folder; --backend onnxruntime "
                          f"runs an export: {hint})")
    missing = missing_entries(path)
    if missing:
        torch_folder = (path / "unet").is_dir() and any((path / "unet").glob("diffusion_pytorch_model*"))
        what = "a diffusers PyTorch folder, not an ONNX export" if torch_folder else "not a complete ONNX export"
        raise NotAnExport(f"model: {path} is {what}: missing {', '.join(missing)} ({hint})")
    index = _read_json(path / "model_index.json")
    if index.get("_class_name") not in ("StableDiffusionPipeline", "OnnxStableDiffusionPipeline",
                                        "ORTStableDiffusionPipeline"):
        raise NotAnExport(f"model: {path}/model_index.json names a {index.get('_class_name')}, not a Stable "
                          "Diffusion pipeline")
    info = _read_json(path / EXPORT_INFO) if (path / EXPORT_INFO).is_file() else {}

    import diffusers
    from transformers import CLIPTokenizer
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", ""), None)
    if sched_cls is None:
        raise NotAnExport(f"model: {path}/scheduler names an unknown scheduler {sched_cfg.get('_class_name')!r}")
    scheduler = sched_cls.from_pretrained(str(path / "scheduler"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as e:
        raise NotAnExport(f"model: cannot load {path}/tokenizer: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    def paths(comp):
        gpu = path / comp / GPU_GRAPH
        return {"cpu": path / comp / GRAPH, "gpu": gpu if gpu.is_file() else None}

    def cfg(comp):
        f = path / comp / "config.json"
        return _read_json(f) if f.is_file() else {}

    unet_cfg = {"time_cond_proj_dim": None, **cfg("unet")}
    vae_cfg = cfg("vae_decoder")
    if "scaling_factor" not in vae_cfg:
        raise NotAnExport(f"model: {path}/vae_decoder/config.json has no scaling_factor (the latents would be "
                          "scaled wrongly)")
    vae_parts = {"vae_decoder": paths("vae_decoder")}
    if (path / "vae_encoder" / GRAPH).is_file():
        vae_parts["vae_encoder"] = paths("vae_encoder")
    text_encoder = OnnxGraph("text_encoder", cfg("text_encoder"), {"text_encoder": paths("text_encoder")})
    unet = OnnxGraph("unet", unet_cfg, {"unet": paths("unet")})
    vae = OnnxGraph("vae", vae_cfg, vae_parts)
    onnx_paths = {**text_encoder.paths, **unet.paths, **vae.paths}
    name = info.get("model", {}).get("name") or path.name
    extra = {"onnx": onnx_paths, "export": info}
    if (path / "low_res_scheduler" / "scheduler_config.json").is_file():  # the x4 upscaler
        extra["low_res_scheduler"] = diffusers.DDPMScheduler.from_pretrained(str(path / "low_res_scheduler"))
        extra["max_noise_level"] = int(index.get("max_noise_level", 350))
    return SDModel(name, "onnx", tokenizer, text_encoder, unet, vae, scheduler, None, None, preset=None, path=path,
                   extra=extra)


def reference_model(onnx_model, safety_checker: bool = True):
    """The PyTorch model an export was made from (for `verify`), rebuilt from fastsd_export.json. The export
    has no safety checker graph: the reference's PyTorch checker is lent to `onnx_model` too, so that both
    sides of the comparison are checked alike."""
    from fastsd.loading import load_model  # lazy: keeps diffusers out of `import fastsd.export`
    info = (onnx_model.extra or {}).get("export") or {}
    src = info.get("model")
    if not src:
        raise NotAnExport(f"model: {onnx_model.path} has no {EXPORT_INFO} naming the model it was exported from, "
                          "so verify cannot rebuild the PyTorch FP32 reference; re-export it with `fastsd export`")
    ref = load_model(src["spec"], random_weights=bool(src.get("random_weights")), seed=int(src.get("seed", 0)),
                     allow_pickle=bool(src.get("allow_pickle")), config=src.get("config"),
                     safety_checker=safety_checker, vae_tiny=src.get("vae_tiny"))
    onnx_model.safety_checker, onnx_model.feature_extractor = ref.safety_checker, ref.feature_extractor
    return ref
