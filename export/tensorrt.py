"""What a TensorRT build needs (trt_profiles.json, BUILD_TENSORRT.md with trtexec lines), and the build
itself through TensorRT's Python API where the `tensorrt` package is installed."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import TensorRTBuildFailed, TensorRTMissing
from .graphs import graph_specs
from .layout import GRAPH
from .writer import write_failure

ENGINE = "model.plan"
WORKSPACE_BYTES = 8 << 30


def have_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def require_tensorrt() -> None:
    if not have_tensorrt():
        raise TensorRTMissing(
            "--tensorrt: the `tensorrt` Python package is not installed here (it needs an NVIDIA GPU and NVIDIA's "
            "wheels); export without --tensorrt and build the engines on the GPU machine with the trtexec lines "
            "in BUILD_TENSORRT.md")


def dynamic_inputs(profiles: dict, comp: str, static: bool) -> list[str]:
    """Inputs with a dynamic axis (the only ones a TensorRT profile may set)."""
    if static:
        return []
    axes = graph_specs(False)[comp].dynamic_axes
    return [name for name in profiles[comp] if name in axes]


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_line(comp: str, profile: dict, dynamic: list[str], fp16: bool) -> str:
    parts = ["trtexec", f"--onnx={comp}/{GRAPH}", f"--saveEngine={comp}/{ENGINE}"]
    for point in ("min", "opt", "max"):
        if dynamic:
            shapes = ",".join(f"{name}:{_dims(profile[name][point])}" for name in dynamic)
            parts.append(f"--{point}Shapes={shapes}")
    if fp16:
        # The graph already holds its fp16 types: build it as typed. TensorRT 11 removed --fp16 (all networks are
        # strongly typed there, --stronglyTyped is the default); on 10.x --stronglyTyped keeps the graph's types.
        parts.append("--stronglyTyped")
    return " \\\n    ".join(parts)


def build_markdown(profiles: dict, *, dtype: str, static: bool, optimize: bool, model_name: str,
                   precision_notes: dict | None = None) -> str:
    """precision_notes: {graph: why} for the graphs of an fp16 export that keep fp32 parts (exporter.precision_plan)."""
    fp16 = dtype == "fp16"
    lines = [f"# Building TensorRT engines for this export ({model_name}, {dtype})", "",
             "Run from this folder on the machine with the GPU the engines are for (an engine is tied to its GPU "
             "and TensorRT version). The shape ranges are those in `trt_profiles.json`; each `*Shapes` flag names "
             "the graph's dynamic inputs only (static ones, such as the UNet's `timestep` [1], need none).", ""]
    if optimize:
        lines += ["This export was made with `--optimize`: `model.onnx` and `model.gpu.onnx` hold onnxruntime "
                  "contrib ops (fused attention, LayerNorm, GELU) that TensorRT's ONNX parser does not know. Build "
                  "TensorRT engines from an export made without `--optimize`.", ""]
    if fp16:
        lines += ["The graphs are fp16 with fp32 inputs and outputs. `--stronglyTyped` builds them with the types "
                  "they hold; the lines work on TensorRT 10 and 11 (11 removed the `--fp16` precision flag: every "
                  "network is strongly typed there).", ""]
        for comp, why in (precision_notes or {}).items():
            lines += [f"- `{comp}`: {why}."]
        if precision_notes:
            lines += [""]
    else:
        lines += ["The graphs are fp32 and build as fp32. For fp16 engines export with `--dtype fp16` (the graph "
                  "then carries its own fp16 types): TensorRT 11 removed `--fp16`, and on 10.x it lets TensorRT "
                  "pick fp16 kernels per layer unchecked. Check an engine with `fastsd verify`.", ""]
    lines += ["```sh"]
    for comp, profile in profiles.items():
        lines += [trtexec_line(comp, profile, dynamic_inputs(profiles, comp, static), fp16), ""]
    lines[-1] = "```"
    lines += ["", "Or let fastsd build them with TensorRT's Python API (where the `tensorrt` package is installed):",
              "`fastsd export ... --tensorrt` writes `<graph>/model.plan` the same way.",
              "", "ONNX Runtime's TensorRT execution provider builds (and caches) its engines itself from "
              "`model.onnx`: `fastsd generate --backend onnxruntime --model DIR` uses it where installed.", ""]
    lines += LORA_REFIT
    return "\n".join(lines)


# How to switch LoRA adapters on a built engine without rebuilding it (TensorRT's refit).
LORA_REFIT = [
    "## Switching LoRA adapters without a rebuild (refit)", "",
    "Build the engine refittable (`trtexec ... --refit`, or `BuilderFlag.REFIT`). A switch from LoRA set A to",
    "set B refits the UNION of the weights A and B touch: every weight that only A touched goes back to its",
    "base value (the initializer in `model.onnx`), and every weight B touches gets base + B's delta. Refitting",
    "only B's layers leaves A's changes in the layers B does not touch, which is how A -> B -> A ends in mixed",
    "images (TensorRT issue #3628). Compute the new values from the base, never by subtracting the old delta.",
    "",
    "fastsd computes exactly those tensors: `fastsd.lora.LoraSwitcher.deltas(...)` gives base + delta per",
    "weight of the new set, and the weights of the old set that it does not name are restored from the",
    "base. For each, `refitter.set_named_weights(name, trt.Weights(array))` on a `trt.Refitter(engine,",
    "logger)`, then `refitter.refit_cuda_engine()`. Names are the ONNX initializer names; the exporter",
    "folds each Linear weight into a transposed MatMul initializer, so match those by value (W.T) against",
    "the torch parameter, once per export. This route is written down, not run: no TensorRT here.", ""]


def build_engines(out: Path, profiles: dict, *, static: bool, fp16: bool, progress: bool = True,
                  fp32_graphs=()) -> dict:
    """Parse each graph with TensorRT's OnnxParser and build a serialized engine with one optimization
    profile (min/opt/max per dynamic input); writes `<graph>/model.plan` via a temporary name.
    fp32_graphs: graphs of an fp16 export kept fp32 (the VAE of force_upcast): no FP16 flag for them."""
    require_tensorrt()
    import tensorrt as trt
    from tqdm.auto import tqdm

    logger = trt.Logger(trt.Logger.WARNING)
    built = {}
    all_fp16 = fp16
    for comp, profile in tqdm(list(profiles.items()), desc="tensorrt", disable=not progress, leave=False):
        fp16 = all_fp16 and comp not in fp32_graphs
        builder = trt.Builder(logger)
        flags = 0
        explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
        if explicit is not None and int(trt.__version__.split(".")[0]) < 10:  # implicit in TensorRT 10
            flags |= 1 << int(explicit)
        typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if fp16 and typed is not None:  # the fp16 graph's own types (always so on TensorRT 11)
            flags |= 1 << int(typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        graph = out / comp / GRAPH
        if not parser.parse_from_file(str(graph)):  # by path: external data is found beside it
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildFailed(f"tensorrt: cannot parse {graph}: {errors[:300]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if fp16 and typed is None and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 8.x: no strong typing
            config.set_flag(trt.BuilderFlag.FP16)
        dynamic = set(dynamic_inputs(profiles, comp, static))
        if dynamic:
            opt_profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                name = network.get_input(i).name
                if name in dynamic:
                    p = profile[name]
                    opt_profile.set_shape(name, p["min"], p["opt"], p["max"])
            config.add_optimization_profile(opt_profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise TensorRTBuildFailed(f"tensorrt: building the engine for {graph} failed (see TensorRT's log above)")
        target = out / comp / ENGINE
        tmp = target.with_name(f".{ENGINE}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(engine))
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_failure(e, str(target)) from e
        built[comp] = {"engine": f"{comp}/{ENGINE}", "bytes": target.stat().st_size,
                       "tensorrt": trt.__version__}
    return built
