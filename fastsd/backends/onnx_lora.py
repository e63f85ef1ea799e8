"""LoRA on an ONNX export's graphs, for the onnxruntime and openvino backends: the fused weights replace the
touched initializers when a session (onnxruntime) or a model (openvino) is made.

An export is never rewritten. For each torch weight a LoRA set touches, `InitializerMap` finds the graph
initializer that holds it and how it is stored: torch's TorchScript exporter keeps Conv weights and Gemm B
(transB=1) as they are, and folds a Linear on a 3-D input into MatMul with the weight transposed under an
anonymous name ("onnx::MatMul_123"); that one is found by the name of the node that reads it, which
carries the module path ("/unet/down_blocks.0/.../attn1/to_q/MatMul"). fastsd's own fusing code
(fastsd.lora.LoraSwitcher) computes the fused tensors; ONNX Runtime takes them through
`SessionOptions.add_external_initializers` (OrtValues that replace the model's initializers of the same
names before its graph optimizations run: `add_initializer` would not do, because the CPU provider's
NCHWc layout pass copies Conv weights into new constants before those are applied). That call replaces
only initializers the model keeps in external data, so the session is made from the graph's bytes with
the touched initializers marked external (the export's files stay as they are). Each LoRA set gets
sessions of its own, kept in a small LRU cache; the set "none" runs the export's own sessions.
The openvino backend reads the same ONNX graphs: its ONNX reader makes each initializer a Constant node of
the same name, and a LoRA set's models have those Constants replaced (backends/openvino/backend.py).

ONNX Runtime's LoRA adapter API (`.onnx_adapter` files, RunOptions.add_active_adapter) needs graphs
that take the A/B matrices as inputs, which a plain export of SD does not have; hence initializers.
A weight the export has no initializer of its own for (shared with another layer, or merged by
`fastsd export --optimize`'s fusions) is refused with its name, never silently left out.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lora import LoraError, LoraRef

log = logging.getLogger("fastsd")

COMPONENTS = ("text_encoder", "unet")  # the graphs a LoRA can touch


def module_key(path: str, comp: str) -> str:
    """A module path in one spelling for both sides: no component prefix, no `text_model.` (which
    transformers 4 has and 5 has not)."""
    parts = [p for p in path.strip(".").split(".") if p]
    if parts and parts[0] == comp:
        parts = parts[1:]
    if parts and parts[0] == "text_model":
        parts = parts[1:]
    return ".".join(parts)


def _scope(node_name: str, comp: str) -> str | None:
    """Module path of a node from its TorchScript-exporter name ("/unet/a.0/b/MatMul" -> "a.0.b")."""
    if not node_name.startswith("/"):
        return None
    parts = node_name.strip("/").split("/")[:-1]
    return module_key(".".join(parts), comp) if parts else None


def _architecture_modules(comp: str, config: dict | None) -> set[str] | None:
    """The module paths of the torch model this graph was exported from, built on the meta device from the
    export's config.json (no weights): tells a weight the export folded away from one the model never had.
    None when the config is not complete enough to build it (then the graph's node names tell)."""
    if not config:
        return None
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            if comp == "unet":
                from diffusers import UNet2DConditionModel
                module = UNet2DConditionModel.from_config(cfg)
            else:
                from transformers import CLIPTextConfig, CLIPTextModel
                module = CLIPTextModel(CLIPTextConfig(**cfg))
    except Exception as e:  # a partial config (another exporter's): fall back to the node names
        log.debug("lora: cannot build the %s architecture from its config (%s)", comp, e)
        return None
    return {module_key(n, comp) for n, m in module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


@dataclass
class Entry:
    initializer: str
    transposed: bool  # stored as W^T (MatMul input, Gemm with transB=0)
    shape: tuple       # the torch weight's shape


class InitializerMap:
    """Which initializer of one graph holds which torch weight, read from the graph's structure only (the
    weights stay on disk until a LoRA needs them)."""

    def __init__(self, comp: str, path, config: dict | None = None):
        self.comp, self.path = comp, Path(path)
        self.module_names = _architecture_modules(comp, config)
        graph = self._graph()
        inits = {i.name: i for i in graph.initializer}
        consumers: dict[str, list] = {}
        self.scopes: set[str] = set()
        for node in graph.node:
            s = _scope(node.name, comp)
            if s:
                self.scopes.add(s)
            for j, x in enumerate(node.input):
                if x in inits:
                    consumers.setdefault(x, []).append((node, j))
        self.entries: dict[str, Entry] = {}
        self.problems: dict[str, str] = {}  # module key -> why its weight cannot be replaced
        for name, init in inits.items():
            if len(init.dims) not in (2, 4):
                continue
            uses = consumers.get(name, [])
            layouts = {self._layout(n, j) for n, j in uses}
            keys = {_scope(n.name, comp) for n, _ in uses if n.op_type != "Identity"} - {None}
            if name.endswith(".weight") and not name.startswith("onnx::"):
                keys = {module_key(name[: -len(".weight")], comp)}
            if len(keys) != 1:
                continue
            key = keys.pop()
            if None in layouts or len(layouts) != 1:
                # read by an op whose weight layout is not one of Conv/Gemm/MatMul (or by several), e.g. an
                # Identity: the exporter merged equal constants of several layers into one initializer
                if any(n.op_type in ("MatMul", "Gemm", "Conv") for n, _ in uses):
                    self.problems[key] = f"its initializer {name!r} is shared with other layers or read by " \
                                         f"{', '.join(sorted({n.op_type for n, _ in uses}))}"
                continue
            transposed = layouts.pop()
            dims = tuple(init.dims)
            shape = (dims[1], dims[0]) if transposed else dims
            if key in self.entries:
                self.problems[key] = f"two initializers ({self.entries[key].initializer!r}, {name!r}) claim it"
                continue
            self.entries[key] = Entry(name, transposed, shape)

    def _graph(self):
        """The graph, loaded on demand and kept until `release` (an embedded text encoder of SD 1.x is ~0.5 GB)."""
        if getattr(self, "_proto", None) is None:
            import onnx
            self._proto = onnx.load(str(self.path), load_external_data=False)
            self._inits = {i.name: i for i in self._proto.graph.initializer}
        return self._proto.graph

    def external(self, initializers: list[str]) -> bytes:
        """The graph with these initializers marked external (their values come with the session options), the
        others as the export has them. Changes the loaded graph: `release` it afterwards."""
        import onnx
        graph = self._graph()
        for name in initializers:
            init = self._inits[name]
            if init.data_location == onnx.TensorProto.EXTERNAL:
                continue
            for f in ("raw_data", "float_data", "int32_data", "double_data"):
                init.ClearField(f)
            init.data_location = onnx.TensorProto.EXTERNAL
            # onnxruntime takes the value from add_external_initializers and never opens this location
            for k, v in (("location", "fastsd-lora-initializer"), ("offset", "0"), ("length", "0")):
                e = init.external_data.add()
                e.key, e.value = k, v
        del graph
        return self._proto.SerializeToString()

    def release(self) -> None:
        self._proto = self._inits = None

    @staticmethod
    def _layout(node, j) -> bool | None:
        """Whether the weight input j of `node` is stored transposed (None: not a weight input we know)."""
        if j != 1:
            return None
        if node.op_type == "Conv":
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return not trans_b
        return None

    def resolve(self, layer_module: str) -> str | None:
        """The weight name "<comp>.<module>.weight" for a LoRA layer's module path, None when this graph has no
        such module; LoraError when it has the module but no initializer of its own for the weight."""
        key = module_key(layer_module, self.comp)
        if key in self.entries:
            return f"{self.comp}.{key}.weight"
        why = self.problems.get(key)
        known = key in self.module_names if self.module_names is not None else \
            any(s == key or s.startswith(key + ".") for s in self.scopes)
        if why is None and not known:
            return None  # not in this architecture: fastsd.lora says so for the whole file
        raise LoraError(f"lora: the ONNX export's {self.comp} graph ({self.path}) cannot take a LoRA on "
                        f"{self.comp}.{key}.weight: "
                        f"{why or 'it has no initializer of its own (constant-folded or fused)'}"
                        "; use an export without --optimize, or the torch backend")

    def entry(self, name: str) -> Entry:
        return self.entries[module_key(name[: -len(".weight")], self.comp)]

    def base(self, name: str) -> torch.Tensor:
        """The export's own value of a weight, in torch's layout and the graph's dtype."""
        from onnx import numpy_helper
        e = self.entry(name)
        self._graph()
        arr = numpy_helper.to_array(self._inits[e.initializer], base_dir=str(self.path.parent))
        return torch.from_numpy(np.array(arr.T if e.transposed else arr, order="C"))  # a writable copy

    def to_initializer(self, name: str, value: torch.Tensor) -> tuple[str, np.ndarray]:
        e = self.entry(name)
        arr = value.detach().cpu().numpy()
        return e.initializer, np.ascontiguousarray(arr.T if e.transposed else arr)


def set_key(refs: tuple[LoraRef, ...]) -> tuple:
    """Cache key of a LoRA set: each file by its resolved path and modification time, and its scale."""
    out = []
    for r in refs:
        p = Path(r.path).expanduser()
        try:
            out.append((str(p.resolve()), p.stat().st_mtime_ns, r.scale))
        except OSError:
            out.append((str(p), 0, r.scale))
    return tuple(out)


class OnnxLoraWeights:
    """fastsd.lora's view of an ONNX backend's weights: read from the export's initializers, written as new
    sessions (or compiled models) with those initializers replaced (`write_set`, the whole set at once). The
    backend gives `lora_graph_path(graph)` and `use_lora_sessions(key, initializers, model_bytes)`."""

    def __init__(self, backend, configs: dict[str, dict]):
        self.backend = backend
        self.configs = configs  # {graph: the config.json the export wrote beside it}
        self._maps: dict[str, InitializerMap] = {}

    def _map(self, comp: str) -> InitializerMap:
        if comp not in self._maps:
            self._maps[comp] = InitializerMap(comp, self.backend.lora_graph_path(comp), self.configs.get(comp))
        return self._maps[comp]

    def resolve(self, layer: str) -> str | None:
        comp, module = layer.split(".", 1)
        if comp not in COMPONENTS:
            return None
        return self._map(comp).resolve(module)

    def get(self, name: str) -> torch.Tensor:
        return self._map(name.split(".", 1)[0]).base(name)

    def write_set(self, refs: tuple[LoraRef, ...], fused: dict[str, torch.Tensor]) -> None:
        """Run `refs`: sessions whose touched initializers hold `fused` (every tensor the set changes; the
        others keep the export's values). An empty set goes back to the export's own sessions."""
        per_graph: dict[str, dict[str, np.ndarray]] = {}
        for name, value in fused.items():
            comp = name.split(".", 1)[0]
            init, arr = self._map(comp).to_initializer(name, value)
            per_graph.setdefault(comp, {})[init] = arr
        try:
            self.backend.use_lora_sessions(set_key(refs), per_graph,
                                           lambda comp, names: self._map(comp).external(names))
        finally:
            for m in self._maps.values():  # base values are read once per tensor (fastsd.lora keeps them)
                m.release()


class SessionCache:
    """Sessions per LoRA set, least recently used first out: {set key: {graph: _Graph}}."""

    def __init__(self, size: int):
        self.size = size
        self._sets: OrderedDict[tuple, dict] = OrderedDict()
        self.made = 0
        self.hits = 0
        self.make_seconds = 0.0

    def get(self, key: tuple, make) -> dict:
        if key in self._sets:
            self._sets.move_to_end(key)
            self.hits += 1
            return self._sets[key]
        t0 = time.perf_counter()
        graphs = make()
        self.make_seconds += time.perf_counter() - t0
        self.made += 1
        self._sets[key] = graphs
        while len(self._sets) > self.size:
            self._sets.popitem(last=False)
        return graphs

    def describe(self) -> dict:
        return {"cached_sets": len(self._sets), "size": self.size, "sessions_made": self.made, "hits": self.hits,
                "session_seconds": round(self.make_seconds, 3)}
