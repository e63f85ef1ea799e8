"""`export_model(model, out)`: every component of an SD model as an ONNX graph, each checked against
the PyTorch FP32 module in ONNX Runtime (CPU), plus the files a TensorRT build needs.

Order of work, so that a failure leaves nothing that looks complete:
  1. options and the output folder are checked before any model work;
  2. each graph is traced (torch's TorchScript exporter), converted (fp16, --optimize), written and
     checked (onnx.checker and shape inference, by path) inside a staging folder `.<graph>.partial-<pid>`;
  3. each staged graph runs in ONNX Runtime against the PyTorch FP32 module (parity);
  4. only then are the staging folders renamed into place, and fastsd_export.json is written last.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fastsd import validation

from . import layout, parity
from .errors import (InvalidParameter, OnnxRuntimeMissing, OutputNotEmpty, ParityError, UnknownComponent,
                     UnsupportedOpset)
from .graphs import COMPONENTS, ModelDims, Range, Shapes, graph_specs, parse_range, trt_profiles
from .layout import EXPORT_ENTRIES, EXPORT_INFO, GPU_GRAPH, GRAPH
from .tensorrt import build_engines, build_markdown, require_tensorrt
from .writer import (EXTERNAL_DATA_THRESHOLD, promote, staging_dir, tensor_bytes, write_failure, write_graph, write_json,
                     write_text)

log = logging.getLogger("fastsd")

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention and the UNet's ops need 14
MAX_OPSET = 20  # the newest torch's TorchScript exporter writes
DTYPES = ("fp32", "fp16")
FORMAT = 1


@dataclass
class ExportOptions:
    components: tuple[str, ...] = COMPONENTS
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"
    static: bool = False
    batch: str | Range = "1:1:4"  # images per call: MIN:OPT:MAX (the UNet gets twice that with guidance)
    resolution: str | Range | None = None  # pixels, square: MIN:OPT:MAX (default: native/2 : native : 2*native)
    optimize: bool = False  # also write onnxruntime-optimized variants (model.onnx CPU-safe, model.gpu.onnx)
    tensorrt: bool = False  # build TensorRT engines (needs the tensorrt package)
    overwrite: bool = False
    check: bool = True  # parity against PyTorch FP32 (turning it off is for debugging only)
    external_data_threshold: int | None = None  # bytes; default writer.EXTERNAL_DATA_THRESHOLD (~2 GB)
    progress: bool = True
    parity_seed: int = 0

    def validated(self) -> "ExportOptions":
        """The checks that need no model: components, opset, dtype, TensorRT availability."""
        comps = self.components
        if isinstance(comps, str):
            comps = [c for c in comps.replace(" ", "").split(",") if c]
        comps = [c for c in comps]
        if "vae" in comps:  # shorthand for both VAE halves
            i = comps.index("vae")
            comps[i:i + 1] = ["vae_decoder", "vae_encoder"]
        for c in comps:
            if c not in COMPONENTS:
                raise UnknownComponent("components", c, ", ".join(COMPONENTS) + " (or vae for both VAE parts)")
        if not comps:
            raise UnknownComponent("components", self.components, ", ".join(COMPONENTS))
        comps = tuple(c for c in COMPONENTS if c in comps)  # canonical order, no duplicates
        try:
            opset = int(self.opset)
        except (TypeError, ValueError):
            opset = None
        if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
            raise UnsupportedOpset("opset", self.opset, f"{MIN_OPSET}..{MAX_OPSET} (torch's ONNX exporter writes up to "
                                   f"{MAX_OPSET}; default {DEFAULT_OPSET})")
        if self.dtype not in DTYPES:
            raise InvalidParameter("dtype", self.dtype, ", ".join(DTYPES))
        batch = parse_range("batch", self.batch, low=1, high=validation.MAX_IMAGES)
        if self.tensorrt:
            if self.optimize:
                raise InvalidParameter("tensorrt", True, "an export without --optimize (onnxruntime's fused ops are "
                                       "not TensorRT ONNX ops)")
            require_tensorrt()
        _require_onnx()
        return dataclasses.replace(self, components=comps, opset=opset, batch=batch)

    def shapes_for(self, model) -> Shapes:
        native = model.native_size
        # the UNet halves the latent once per down block: latents must divide by that
        multiple = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)

        def snap(v):  # nearest allowed size
            v = max(validation.MIN_SIZE, min(validation.MAX_SIZE, v))
            return max(multiple, (v // multiple) * multiple)
        res = self.resolution if self.resolution is not None else f"{snap(native // 2)}:{snap(native)}:{snap(native * 2)}"
        resolution = parse_range("resolution", res, low=validation.MIN_SIZE, high=validation.MAX_SIZE,
                                 multiple=multiple)
        batch = parse_range("batch", self.batch, low=1, high=validation.MAX_IMAGES)
        # the prompt length: the tokenizer's (CLIP's 77 where a pipeline has none: prompt_embeds-only use)
        sequence = getattr(model.tokenizer, "model_max_length", None) or 77
        return Shapes(batch, resolution, bool(self.static), int(sequence))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise OnnxRuntimeMissing(f"export needs onnx and onnxruntime ({e.name} is not installed): "
                                 "pip install 'fastsd[onnx]'") from None


def prepare_out(out, overwrite: bool) -> Path:
    """The output folder, empty or (with overwrite) cleared of a previous export's entries only."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidParameter("out", str(out), "a folder (this is a file)")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputNotEmpty(f"out: {path} is not empty ({len(entries)} entries: {shown}); pass --overwrite to "
                                 "replace the export there, or name an empty or new folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(e, str(path)) from e
    if not os.access(path, os.W_OK):
        raise InvalidParameter("out", str(out), "a writable folder")
    return path


def _clear_previous(path: Path) -> None:
    """--overwrite: the marker first (so the folder never looks complete meanwhile), then the rest."""
    for name in (EXPORT_INFO, *EXPORT_ENTRIES):
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in path.glob(".*.partial-*"):
        shutil.rmtree(p, ignore_errors=True)


def model_source(model, **given) -> dict:
    """How to rebuild `model` with load_model (what verify needs)."""
    src = {"name": model.name, "source": model.source, "random_weights": model.source == "random", "seed": 0,
           "allow_pickle": False, "config": None}
    if model.source == "random":
        src["spec"] = model.preset.name if model.preset else model.name
    elif model.preset is not None and model.source in ("hub", "packaged"):
        src["spec"] = model.preset.name
    elif model.path is not None:
        src["spec"] = str(Path(model.path).resolve())
        if model.source == "single-file" and model.preset is not None:
            src["config"] = model.preset.name
    else:
        src["spec"] = model.name
    if (model.extra or {}).get("vae_tiny"):
        src["vae_tiny"] = model.extra["vae_tiny"]
    src.update({k: v for k, v in given.items() if v is not None})
    return src


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import transformers
    from importlib.metadata import version
    return {"fastsd": version("fastsd"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _trace(module, inputs: dict, spec, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes: expected
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes=spec.dynamic_axes or None, do_constant_folding=True)


def _export_component(model, comp, spec, dims, shapes, opts, staging: Path) -> dict:
    import onnx
    from .transforms import optimized, to_fp16  # lazy: onnx only when a graph is written
    threshold = opts.external_data_threshold
    module = spec.module(model)
    inputs = spec.sample_inputs(dims, spec.input_shapes(dims, shapes, "opt"), seed=opts.parity_seed)
    raw = staging / "raw"
    raw.mkdir()
    _trace(module, inputs, spec, raw / GRAPH, opts.opset)
    proto = onnx.load(str(raw / GRAPH))  # with its external data, if torch wrote any
    shutil.rmtree(raw)
    big = tensor_bytes(proto) >= EXTERNAL_DATA_THRESHOLD
    fp16 = opts.dtype == "fp16"
    files = {}
    if not opts.optimize:
        if fp16:
            proto = to_fp16(proto, big)
        files[GRAPH] = write_graph(proto, staging / GRAPH, threshold)
        files[GRAPH]["variant"] = "plain"
    else:
        plain = staging / "plain.onnx"
        write_graph(proto, plain, threshold)
        del proto
        for variant, name in (("cpu", GRAPH), ("gpu", GPU_GRAPH)):
            m, stats = optimized(plain, comp, variant, fp16, quiet=not opts.progress)
            if fp16:
                m = to_fp16(m, big)
            files[name] = write_graph(m, staging / name, threshold)
            files[name].update(variant=variant, fused_ops=stats)
            del m
        for p in (plain, plain.with_name(plain.name + ".data")):
            p.unlink(missing_ok=True)
    layout.write_config(model, comp, staging)
    return files


def _gpu_providers() -> list[str]:
    import onnxruntime as ort
    avail = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in avail else []


def _check_component(model, comp, spec, dims, shapes, opts, staging: Path, files: dict) -> list[parity.Parity]:
    module = spec.module(model)
    inputs = spec.sample_inputs(dims, spec.input_shapes(dims, shapes, "opt"), seed=opts.parity_seed + 1)
    reference = parity.torch_outputs(module, inputs)
    rows = []
    for name, info in files.items():
        providers = ["CPUExecutionProvider"]
        if info.get("variant") == "gpu":
            providers = _gpu_providers() or providers
            try:
                sess = parity.session(staging / name, providers)
            except Exception as e:  # fused ops with no CPU kernel (NhwcConv, GroupNorm, ...): expected on CPU
                info["parity"] = f"not run: no CUDA provider here and the CPU provider cannot load it " \
                                 f"({str(e).splitlines()[0][:160]})"
                continue
        else:
            sess = parity.session(staging / name, providers)
        row = parity.compare(f"{comp}/{name}", opts.dtype, sess, reference, inputs)
        del sess
        info["parity"] = row.to_dict()
        rows.append(row)
    return rows


def export_model(model, out, options: ExportOptions | None = None, *, source: dict | None = None,
                 echo: Callable[[str], None] | None = tqdm.write, **overrides) -> dict:
    """Export `model` (an SDModel, FP32 on CPU) to the folder `out`; returns what fastsd_export.json holds.

    options/overrides: see ExportOptions. source: how to rebuild the model for verify (spec,
    random_weights, seed, ...); derived from the model when not given. Raises FastSDError subclasses:
    UnknownComponent, UnsupportedOpset, OutputNotEmpty, DiskFull, ParityError, TensorRTMissing."""
    opts = dataclasses.replace(options or ExportOptions(), **overrides).validated()
    needs = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
    for part in dict.fromkeys(needs[c] for c in opts.components if c in needs):  # what the graphs are made of
        module = getattr(model, part)
        if module is None:
            raise InvalidParameter("model", f"no {part}", f"a model with a {part} (the graphs asked for need it)")
        p = next(module.parameters(), None)
        if p is None or p.dtype != torch.float32 or p.device.type != "cpu":
            raise InvalidParameter("model", f"{part} in {getattr(p, 'dtype', 'no torch weights')}",
                                   "an SDModel with its PyTorch modules in FP32 on the CPU (the parity reference); "
                                   "load it anew: optimize() moves and converts a model's modules")
    out = prepare_out(out, opts.overwrite)
    shapes = opts.shapes_for(model)
    dims = ModelDims.of(model)
    specs = graph_specs(opts.static, dims.class_labels)
    say = echo or (lambda s: None)
    if opts.overwrite:
        _clear_previous(out)
    staged: dict[str, Path] = {}
    graphs: dict[str, dict] = {}
    try:
        for comp in tqdm(opts.components, desc="export", unit="graph", disable=not opts.progress, leave=False):
            staged[comp] = staging_dir(out, comp)
            try:
                graphs[comp] = _export_component(model, comp, specs[comp], dims, shapes, opts, staged[comp])
            except OSError as e:
                raise write_failure(e, f"{out}/{comp}/{GRAPH}") from e
            sizes = ", ".join(f"{n} {i['bytes_on_disk'] / 1e6:.1f} MB" + (" (external data)" if i["external_data"]
                                                                           else "") for n, i in graphs[comp].items())
            say(f"exported {comp}: {sizes}")
        rows: list[parity.Parity] = []
        if opts.check:
            say(f"parity against PyTorch FP32 on ONNX Runtime CPU (relative error = max abs / max |reference|; "
                f"tolerance {opts.dtype}: rel <= {parity.TOLERANCES[opts.dtype]:g})")
            for comp in tqdm(opts.components, desc="parity", unit="graph", disable=not opts.progress, leave=False):
                new = _check_component(model, comp, specs[comp], dims, shapes, opts, staged[comp], graphs[comp])
                for r in new:
                    say("  " + r.line())
                for name, info in graphs[comp].items():
                    if isinstance(info.get("parity"), str):
                        say(f"  {comp + '/' + name:<28} {info['parity']}")
                rows += new
            failed = [r for r in rows if not r.passed]
            if failed:
                raise ParityError("export: " + "; ".join(
                    f"{r.graph} is beyond the {r.dtype} tolerance (rel {r.max_rel:.2e} > {r.tolerance:g}, max abs "
                    f"{r.max_abs:.2e})" for r in failed) + "; nothing was written")
        parts = [("tokenizer", layout.save_tokenizer, model.tokenizer),
                 ("scheduler", layout.save_scheduler, model.scheduler)]
        if model.extra.get("low_res_scheduler") is not None:  # the x4 upscaler's noise schedule for its input
            parts.append(("low_res_scheduler", layout.save_scheduler, model.extra["low_res_scheduler"]))
        for part, save, obj in parts:
            if obj is None:  # a pipeline without a tokenizer (prompt_embeds-only use)
                continue
            staged[part] = staging_dir(out, part)
            try:
                save(obj, staged[part])
            except OSError as e:
                raise write_failure(e, f"{out}/{part}") from e
        for name, folder in list(staged.items()):
            promote(folder, out / name)
            del staged[name]
    finally:
        for folder in staged.values():
            shutil.rmtree(folder, ignore_errors=True)

    profiles = trt_profiles(dims, shapes, opts.components)
    write_json(out / "model_index.json", layout.model_index(model, opts.components))
    write_json(out / "trt_profiles.json", profiles)
    write_text(out / "BUILD_TENSORRT.md", build_markdown(profiles, dtype=opts.dtype, static=opts.static,
                                                         optimize=opts.optimize, model_name=model.name))
    engines = None
    if opts.tensorrt:
        engines = build_engines(out, profiles, static=opts.static, fp16=opts.dtype == "fp16", progress=opts.progress)
    info = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_source(model, **(source or {})),
        "dtype": opts.dtype, "opset": opts.opset, "static": opts.static, "shapes": shapes.to_dict(),
        "components": list(opts.components),
        "graphs": graphs,
        "variants": ({GRAPH: "onnxruntime-optimized, CPU-safe fusions only (runs on every provider)",
                      GPU_GRAPH: "onnxruntime-optimized, all fusions (CUDA/TensorRT providers only)"}
                     if opts.optimize else {GRAPH: "plain export (TensorRT-ready)"}),
        "parity": {"tolerance_rel": parity.TOLERANCES, "seed": opts.parity_seed + 1, "provider": "CPUExecutionProvider",
                   "results": [r.to_dict() for r in rows]},
        "tensorrt": engines,
        "versions": _versions(),
    }
    write_json(out / EXPORT_INFO, info)
    return info


def export_onnx(model, folder, **options) -> dict:
    """export_model with default options; overwrites what an earlier export left in `folder`."""
    options.setdefault("overwrite", True)
    options.setdefault("progress", False)
    return export_model(model, folder, echo=None, **options)
