"""OpenVINO backend: runs a fastsd ONNX export (or a PyTorch model, exported on the fly into a cache folder)
with OpenVINO's CPU runtime inside the engine's loop.

OpenVINO is much faster with static shapes (Hugging Face measured 16.7 s dynamic vs 4.7 s static for 20 SD
steps on a Xeon), so each graph is reshaped and compiled once per input shape (batch, height, width): the
compiled models are kept in memory (the last MAX_SHAPES per graph) and on disk through OpenVINO's own model
cache (CACHE_DIR), so a shape compiled before loads from the cache in a later process.

--dtype maps to INFERENCE_PRECISION_HINT: fp32 -> f32 (forced: on a CPU with native bf16 OpenVINO would
otherwise pick bf16 by itself), bf16 -> bf16 for the UNet and the VAE decoder, the text encoder kept in
f32 as in the torch backend's CPU recipe. On a CPU without native bf16 (no AVX512_BF16/AMX) OpenVINO has no
bf16 kernels: the backend then runs f32, says so in describe(), and is as fast as fp32 there.
Threads follow torch's thread count (--threads), as the onnxruntime backend's do.

Every SD-family kind runs: the depth UNet takes its depth map as a fifth `sample` channel, the x4 upscaler's
UNet takes the noise level as `class_labels` (int64, one per image, part of the compiled shape)."""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidParameter, ModelLoadError

log = logging.getLogger("fastsd")

MAX_SHAPES = 4  # compiled shapes kept in memory per graph; older ones are dropped (the disk cache keeps them)
PRECISION = {"fp32": "f32", "bf16": "bf16"}


def cache_root() -> Path:
    """Where compiled models (OpenVINO's CACHE_DIR) and on-the-fly exports go: FASTSD_OPENVINO_CACHE, else
    ~/.cache/fastsd/openvino."""
    return Path(os.environ.get("FASTSD_OPENVINO_CACHE") or Path.home() / ".cache" / "fastsd" / "openvino")


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise ModelLoadError("backend openvino: the openvino package is not installed "
                             "(pip install 'fastsd[openvino]')") from None
    return openvino


def native_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels on this CPU (AVX512_BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_config(config, what: str = "the openvino backend") -> None:
    """dtype fp32 or bf16 on the CPU: what OpenVINO's CPU runtime runs."""
    if config.dtype not in PRECISION:
        raise InvalidParameter("dtype", config.dtype, f"fp32, bf16 ({what} runs on the CPU)")
    if config.device != "cpu":
        raise InvalidParameter("device", config.device, f"cpu ({what} runs on the CPU)")


def inference_precision(core, dtype: str) -> str:
    """INFERENCE_PRECISION_HINT for --dtype: f32, or bf16 where the CPU has native bf16 (else f32, warned)."""
    precision = PRECISION[dtype]
    if precision == "bf16" and not native_bf16(core):
        log.warning("openvino: this CPU has no native bf16 (no AVX512_BF16 or AMX): OpenVINO runs f32 "
                    "instead, at fp32 speed and precision")
        precision = "f32"
    return precision


def compile_properties(cache_dir: Path, precision: str, threads: int) -> dict:
    """What each graph is compiled with. One cache folder per precision and thread count: OpenVINO 2026.4's
    cache key leaves the precision hint out (measured: an f32 blob loaded for a bf16 request gave wrong
    numbers, NaN on the tiny UNet)."""
    folder = Path(cache_dir) / f"{precision}-{threads}t"
    folder.mkdir(parents=True, exist_ok=True)
    return {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads, "CACHE_DIR": str(folder)}


class StaticGraph:
    """One ONNX graph, compiled by OpenVINO per input shape. The source model is read once; each new shape
    compiles a reshaped clone of it (an LRU of MAX_SHAPES compiled models). `constants` ({initializer name:
    array}, a LoRA set's fused weights) replace the Constant nodes OpenVINO's ONNX reader made of those
    initializers; such a graph is compiled without the disk cache (a blob must never stand for other weights)."""

    def __init__(self, core, name: str, path: Path, properties: dict, static: tuple[str, ...],
                 max_shapes: int | None = None, constants: dict[str, np.ndarray] | None = None):
        self.core, self.name, self.path = core, name, Path(path)
        self.constants = constants or {}
        self.properties = {k: v for k, v in properties.items() if k != "CACHE_DIR"} if constants else properties
        self.static = static  # the inputs whose shape defines a compiled model (timestep keeps its own)
        self.max_shapes = max_shapes or MAX_SHAPES
        self.source = None
        self.compiled: OrderedDict[tuple, object] = OrderedDict()
        self.compiles = 0  # how many times a shape was compiled (or loaded from the disk cache)

    def _source(self):
        if self.source is None:
            try:
                self.source = self.core.read_model(str(self.path))
            except Exception as e:  # openvino raises RuntimeError with a long C++ trace
                raise ModelLoadError(f"model: openvino cannot read {self.path}: {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0][:300]}") from e
            self.types = {i.get_any_name(): i.get_element_type().to_dtype() for i in self.source.inputs}
            if self.constants:
                replace_constants(self.source, self.constants, self.path)
        return self.source

    def dtype(self, name: str):
        self._source()
        return self.types[name]

    def input_shape(self, name: str):
        return self._source().input(name).get_partial_shape()

    def request(self, shapes: dict[str, tuple]):
        key = tuple(sorted(shapes.items()))
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        model = self._source().clone()
        try:
            model.reshape({k: list(v) for k, v in shapes.items()})
        except Exception as e:
            raise InvalidParameter("shape", dict(shapes), f"shapes {self.path} can be reshaped to "
                                   f"({str(e).strip().splitlines()[0][:200]})") from None
        compiled = self.core.compile_model(model, "CPU", self.properties)
        self.compiles += 1
        log.info("openvino: compiled %s for %s", self.name, ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
        req = compiled.create_infer_request()
        self.compiled[key] = req
        if len(self.compiled) > self.max_shapes:
            self.compiled.popitem(last=False)
        return req

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        req = self.request({k: tuple(v.shape) for k, v in feed.items() if k in self.static})
        req.infer(feed)
        return req.get_output_tensor(0).data.copy()


UNET_STATIC = ("sample", "encoder_hidden_states", "class_labels")  # the UNet inputs whose shapes key a compile
STATIC = {"text_encoder": ("input_ids",), "unet": UNET_STATIC}


def replace_constants(model, constants: dict[str, np.ndarray], path) -> None:
    """Put `constants` in place of the model's Constant nodes of those names (their ONNX initializers)."""
    from openvino import opset13
    found = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            for name in (op.get_friendly_name(), *op.output(0).get_names()):
                if name in constants:
                    found[name] = op
    missing = sorted(set(constants) - set(found))
    if missing:  # the map reads the same ONNX file, so this is an exporter or reader change, said plainly
        raise ModelLoadError(f"model: openvino read no Constant for initializer(s) {missing[:3]} of {path}")
    for name, op in found.items():
        arr = constants[name]
        if tuple(op.get_output_shape(0)) != arr.shape:
            raise ModelLoadError(f"model: {path}: {name} holds {list(op.get_output_shape(0))}, the LoRA gave "
                                 f"{list(arr.shape)}")
        op.output(0).replace(opset13.constant(arr.astype(op.get_output_element_type(0).to_dtype())).output(0))
    model.validate_nodes_and_infer_types()


def run_unet(g: StaticGraph, sample: torch.Tensor, timestep: float, encoder_hidden_states: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """One call of a UNet graph (one timestep for the batch), fp32 out on the CPU. class_labels: the x4
    upscaler's noise levels, one per image (its export's UNet graph takes them as an int64 input)."""
    ts = np.asarray(float(timestep), dtype=g.dtype("timestep"))
    if g.input_shape("timestep").rank.get_length() == 1:
        ts = ts.reshape(1)
    feed = {"sample": sample.detach().cpu().float().numpy(), "timestep": ts,
            "encoder_hidden_states": encoder_hidden_states.detach().cpu().float().numpy()}
    if class_labels is not None:
        if "class_labels" not in g.types:
            raise ModelLoadError(f"model: the UNet graph {g.path} takes no class_labels (not an x4 upscaler export)")
        feed["class_labels"] = class_labels.detach().cpu().numpy().astype(g.dtype("class_labels"))
    return torch.from_numpy(g.run(feed))


def run_decoder(g: StaticGraph, latents: torch.Tensor) -> torch.Tensor:
    """One call of a VAE decoder graph: the image in [-1, 1], fp32 on the CPU."""
    return torch.from_numpy(g.run({"latent_sample": latents.detach().cpu().float().numpy()}))


def weights_fingerprint(model) -> str:
    """A fingerprint of a PyTorch model's weights, names and shapes: the key of its on-the-fly export. It
    samples up to 4096 values of every tensor (hashing all 1.1B parameters of SD would take seconds)."""
    h = hashlib.sha256()
    for part in ("text_encoder", "unet", "vae"):
        module = getattr(model, part)
        if module is None:  # a pipeline without a text encoder (prompt_embeds-only use)
            h.update(f"{part}:none".encode())
            continue
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{part}.{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def export_for_openvino(model, components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")) -> Path:
    """The ONNX export of a PyTorch SDModel in the cache folder, written now when it is not there yet or
    lacks one of `components` (the exporter checks every graph against PyTorch before it writes anything)."""
    import json

    from filelock import FileLock
    folder = cache_root() / "exports" / f"{model.name.replace('/', '--')}-{weights_fingerprint(model)}"
    info = folder / "fastsd_export.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Processes sharing the cache (replicas of one deployment, test workers) may ask for one model at once: the
    # export overwrites the folder, so one of them writes it and the others wait, then find it there.
    with FileLock(str(folder) + ".lock"):
        if info.is_file():
            have = json.loads(info.read_text()).get("components", [])
            if set(components) <= set(have):
                return folder
            components = tuple(dict.fromkeys([*have, *components]))  # keep what an earlier caller needed
        from fastsd.export import export_model  # lazy: the exporter (onnx) only for an export
        log.info("openvino: exporting %s of %s to ONNX in %s (once per model)", ", ".join(components), model.name,
                 folder)
        export_model(model, folder, components=",".join(components), overwrite=True, progress=False, echo=None)
    return folder


class OpenVINOBackend:
    name = "openvino"

    def __init__(self, model, config):
        ov = import_openvino()
        check_config(config)
        self.converted = None
        paths = (getattr(model, "extra", None) or {}).get("onnx")
        if not paths:  # a PyTorch model: export it once into the cache, then run the graphs
            from fastsd.export import load_onnx_model  # lazy: the export reader only for a torch model
            # the VAE encoder too: image-to-image and inpainting (a cached export without it is written again)
            folder = export_for_openvino(model, ("text_encoder", "unet", "vae_decoder", "vae_encoder"))
            onnx_model = load_onnx_model(folder)
            # the engine needs only the configs of the networks: drop the torch weights it no longer runs
            model.text_encoder, model.unet, model.vae = onnx_model.text_encoder, onnx_model.unet, onnx_model.vae
            model.extra = {**(model.extra or {}), "onnx": onnx_model.extra["onnx"], "export": onnx_model.extra["export"]}
            paths, self.converted = model.extra["onnx"], str(folder)
        for need in ("text_encoder", "unet", "vae_decoder"):
            if need not in paths:
                raise ModelLoadError(f"model: the export at {model.path} has no {need} graph")
        exported = ((model.extra or {}).get("export") or {}).get("dtype", "fp32")
        if exported != "fp32":
            raise InvalidParameter("model", f"an {exported} export", "an fp32 export (the openvino backend picks its "
                                   "precision itself from --dtype; export with --dtype fp32)")
        self.core = ov.Core()
        self.cache_root = cache_root()
        self.cache_dir = self.cache_root / "compiled"
        self.native_bf16 = native_bf16(self.core)
        self.requested = config.dtype
        precision = inference_precision(self.core, config.dtype)
        self.precision = precision
        self.threads = torch.get_num_threads()
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # what the engine reports
        self.device = torch.device("cpu")
        self.folder = model.path if model.path is not None else (Path(self.converted) if self.converted else None)

        def props(prec):
            return compile_properties(self.cache_dir, prec, self.threads)
        self.props = props
        self.paths = paths
        self.int8 = config.int8
        unet_path = paths["unet"]["cpu"]
        if config.int8 != "off":  # NNCF int8 UNet, calibrated once per export and cached (int8.py)
            from .int8 import int8_unet  # lazy: NNCF only for --int8
            unet_path = int8_unet(self, model, Path(unet_path), config.calibration_prompts, config.int8)
        self.graphs = {
            # the text encoder stays in f32 as in the torch CPU recipe: cheap, and its error reaches every step
            "text_encoder": StaticGraph(self.core, "text_encoder", paths["text_encoder"]["cpu"], props("f32"),
                                        ("input_ids",)),
            "unet": StaticGraph(self.core, "unet", unet_path, props(precision), UNET_STATIC),
            "vae_decoder": StaticGraph(self.core, "vae_decoder", paths["vae_decoder"]["cpu"], props(precision),
                                       ("latent_sample",)),
        }
        self.ov_version = ov.__version__
        self.base_graphs = {c: self.graphs[c] for c in STATIC}  # what a LoRA set replaces, and "none" restores
        self.configs = {c: dict(vars(getattr(model, c).config)) for c in STATIC}
        self.lora_sets = None  # onnx_lora.SessionCache, made on the first LoRA set

    # -- LoRA sets (backends/onnx_lora.py) ------------------------------------------------------------------
    LORA_SETS = 2  # LoRA sets whose compiled graphs are kept (each holds its own copy of a UNet's weights)

    def lora_weights(self):
        """The weights LoRA sets are fused into (fastsd.lora): the export's initializers, replaced per set."""
        if self.int8 != "off":
            raise InvalidParameter("lora", "with --int8", "LoRAs on the fp32/bf16 graphs of the openvino backend "
                                   "(the int8 UNet is calibrated for the export's own weights)")
        from ..onnx_lora import OnnxLoraWeights, SessionCache  # lazy: onnx graph reading only for a LoRA set
        if self.lora_sets is None:
            self.lora_sets = SessionCache(self.LORA_SETS)
        return OnnxLoraWeights(self, self.configs)

    def lora_graph_path(self, comp: str) -> Path:
        return Path(self.paths[comp]["cpu"])

    def use_lora_sessions(self, key: tuple, initializers: dict[str, dict[str, np.ndarray]], model_bytes=None):
        """Run the graphs of one LoRA set: models with `initializers` ({graph: {name: array}}) in place of the
        export's Constants, made on first use and cached by `key`; an empty set runs the export's own graphs."""
        def make():
            graphs = {comp: StaticGraph(self.core, comp, self.lora_graph_path(comp), self.base_graphs[comp].properties,
                                        STATIC[comp], constants=arrays) for comp, arrays in initializers.items()}
            for g in graphs.values():
                g._source()  # read and replace now: a failure belongs to set_loras, not to the next generation
            return graphs
        made = self.lora_sets.get(key, make) if initializers else {}
        for comp, g in self.base_graphs.items():
            self.graphs[comp] = made.get(comp, g)

    def calibration_graph(self, name: str) -> StaticGraph:
        """`name`'s FP32 graph, for int8 calibration (its compiled shapes are dropped with it)."""
        return StaticGraph(self.core, name, self.paths[name]["cpu"], self.props("f32"),
                           ("input_ids",) if name == "text_encoder" else UNET_STATIC)

    # -- the three calls the engine makes -----------------------------------------------------------
    def prepare(self, batch: int, height: int, width: int, guided: bool) -> None:
        """Nothing ahead of time: each graph compiles a new shape on its first call (or loads it from the
        disk cache)."""

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        g = self.graphs["text_encoder"]
        return torch.from_numpy(g.run({"input_ids": input_ids.cpu().numpy().astype(g.dtype("input_ids"))})).float()

    def unet(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """class_labels: the x4 upscaler's noise levels. A depth UNet needs nothing more: its depth map is
        its fifth `sample` channel."""
        t = float(timestep.item() if torch.is_tensor(timestep) else timestep)
        return run_unet(self.graphs["unet"], sample, t, encoder_hidden_states, class_labels)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent_parameters [B, 8, h, w] (mean and log-variance) from the export's
        vae_encoder graph, for image-to-image and inpainting; compiled on first use, at the VAE decoder's
        precision."""
        if "vae_encoder" not in self.graphs:
            if "vae_encoder" not in self.paths:
                raise ModelLoadError(f"model: the export at {self.folder} has no vae_encoder graph, which "
                                     "image-to-image and inpainting need; export with --components text_encoder,unet,vae")
            self.graphs["vae_encoder"] = StaticGraph(self.core, "vae_encoder", self.paths["vae_encoder"]["cpu"],
                                                     self.props(self.precision), ("sample",))
        g = self.graphs["vae_encoder"]
        return torch.from_numpy(g.run({"sample": image.detach().cpu().float().numpy()})).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return run_decoder(self.graphs["vae_decoder"], latents)

    def describe(self) -> dict:
        d = {"backend": self.name, "device": "cpu", "dtype": self.requested,
             "inference_precision": {"text_encoder": "f32", "unet": self.precision, "vae_decoder": self.precision},
             "native_bf16": self.native_bf16, "static_shapes": True, "threads": self.threads,
             "openvino": self.ov_version, "cache_dir": str(self.cache_dir)}
        if self.converted:
            d["converted"] = self.converted
        if self.lora_sets is not None:
            d["lora_sets"] = self.lora_sets.describe()
        if self.int8 != "off":
            d["int8"] = self.int8
            d["inference_precision"]["unet"] = f"int8 ({self.int8}) + {self.precision}"
        if self.requested == "bf16" and self.precision != "bf16":
            d["note"] = "no native bf16 on this CPU: OpenVINO ran f32"
        return d
