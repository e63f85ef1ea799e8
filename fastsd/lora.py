"""LoRA adapters: read them (diffusers/PEFT and kohya/A1111 layouts), fuse the active set into the weights,
and switch sets exactly.

Fusing writes W + sum_i(scale_i * alpha_i / rank_i * up_i @ down_i) into the weight in place (`copy_`),
so no step pays extra matmuls and compiled graphs or CUDA graphs that point at the weight's storage stay
valid. Before a tensor is first written, a copy of it is kept; a switch restores every tensor the old set
touched from that copy (bit for bit; never by subtracting, which drifts) and then fuses the new set from
the copy. The deltas of several adapters are summed in fp32 and added once, so a set of LoRAs costs one
rounding to the weight's dtype, whatever its size.

Reading goes through diffusers: `StableDiffusionLoraLoaderMixin.lora_state_dict` (which converts the kohya
layout) and diffusers' PEFT key converters. Only the arithmetic of the delta is written here: PEFT's own
`get_delta_weight` needs its layers injected into the model, which changes the module tree a compiled
graph was built on.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels
from .errors import FastSDError, InvalidParameter
from .validation import MAX_LORA_SCALE as MAX_SCALE  # noqa: F401 - the name callers import from here
from .validation import lora_scale as check_scale

log = logging.getLogger("fastsd")

COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_A, _B = ".lora_A.weight", ".lora_B.weight"


class LoraError(FastSDError):
    """A LoRA file that cannot be used with this model (missing, unreadable, wrong layers or shapes)."""


@dataclass(frozen=True)
class LoraRef:
    """One entry of a LoRA set: a file and the scale it is fused at."""
    path: str
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{Path(self.path).name}:{self.scale:g}"


def parse_lora_arg(text: str) -> LoraRef:
    """`FILE[:SCALE]` (the CLI's --lora). A trailing `:NUMBER` is the scale; without it the scale is 1."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
        return LoraRef(head, check_scale(tail))
    if sep and head and not re.fullmatch(r"[\\/].*", tail):  # "FILE:abc": a scale that is not a number
        raise InvalidParameter("lora scale", tail, f"a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}] after FILE:")
    return LoraRef(str(text), 1.0)


def as_refs(loras) -> tuple[LoraRef, ...]:
    """A LoRA set from what a caller gives: [(path, scale), ...], ["FILE:SCALE", ...], LoraRefs, or None/[]."""
    out = []
    for item in loras or ():
        if isinstance(item, LoraRef):
            out.append(LoraRef(item.path, check_scale(item.scale)))
        elif isinstance(item, (str, Path)):
            out.append(parse_lora_arg(str(item)))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoraRef(str(item[0]), check_scale(item[1])))
        else:
            raise InvalidParameter("loras", item, "a list of (path, scale) pairs or 'FILE[:SCALE]' strings")
    return tuple(out)


# ------------------------------------------------------------------------------------------ reading
@dataclass
class LoraFactors:
    """One adapted layer: delta = alpha / rank * up @ down (at scale 1)."""
    down: torch.Tensor  # [rank, in, (kh, kw)]
    up: torch.Tensor    # [out, rank, (1, 1)]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    path: str
    layers: dict[str, LoraFactors] = field(default_factory=dict)  # "unet.<module>" / "text_encoder.<module>"
    layout: str = "diffusers"  # diffusers | kohya

    def describe(self) -> dict:
        ranks = sorted({f.rank for f in self.layers.values()})
        return {"path": self.path, "layout": self.layout, "layers": len(self.layers), "ranks": ranks,
                "components": sorted({k.split(".", 1)[0] for k in self.layers})}


def read_tensors(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    if not path.is_file():
        raise InvalidParameter("lora", str(path), "an existing .safetensors LoRA file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for a broken header
            raise LoraError(f"lora: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InvalidParameter("lora", str(path), "a .safetensors file (pickled LoRA files load only with "
                                   "--allow-pickle, and then with weights_only=True)")
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoraError(f"lora: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise LoraError(f"lora: {path} holds a {type(sd).__name__}, not a state dict")
        return sd, {}
    raise InvalidParameter("lora", str(path), "a .safetensors file (or .bin/.pt/.ckpt with --allow-pickle)")


def _metadata_alpha(meta: dict, component: str, module: str) -> float | None:
    """lora_alpha from diffusers' `lora_adapter_metadata` (a PEFT LoraConfig per component), if present."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    pattern = cfg.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():  # PEFT matches a pattern against the end of the module name
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    value = cfg.get(f"{component}.lora_alpha")
    return float(value) if value is not None else None


def _to_peft(component: str, sd: dict) -> dict:
    """Keys of one component in PEFT's naming (`<module>.lora_A.weight` / `.lora_B.weight`), whichever of
    diffusers' historical layouts they came in. The converters guess the layout from the keys and give up
    on a set too small to tell; then the keys are already in a layout they need not convert."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)
    if all(k.endswith((_A, _B)) for k in sd):
        return sd
    if component == "unet":  # as diffusers' UNet loader does; then the text-encoder-style names, if any
        sd = convert_unet_state_dict_to_peft(sd)
        if all(k.endswith((_A, _B)) for k in sd):
            return sd
    else:
        try:
            sd = convert_state_dict_to_diffusers(sd)
        except ValueError:
            pass
    try:
        return convert_state_dict_to_peft(sd)
    except ValueError:
        return sd


def read_lora(path, *, allow_pickle: bool = False, unet_config=None) -> LoraFile:
    """Read one LoRA file in the diffusers/PEFT or the kohya/A1111 layout, UNet and text encoder parts."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    path = Path(path).expanduser()
    raw, meta = read_tensors(path, allow_pickle)
    layout = "kohya" if raw and all(k.startswith(("lora_te_", "lora_unet_")) for k in raw) else "diffusers"
    try:
        sd, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw, unet_config=unet_config)
    except Exception as e:  # diffusers' converters raise ValueError/KeyError on keys they do not know
        raise LoraError(f"lora: {path} is not a LoRA file diffusers can read: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from e
    network_alphas = network_alphas or {}
    parts: dict[str, dict] = {c: {} for c in COMPONENTS}
    alphas: dict[str, dict] = {c: {} for c in COMPONENTS}
    for k, v in sd.items():
        comp = next((c for c in COMPONENTS if k.startswith(c + ".")), None)
        if comp is None:
            if k.startswith(("text_encoder_2.", "te2.", "lora_te2_")):
                raise LoraError(f"lora: {path} is for a model with two text encoders (SDXL); fastsd runs SD 1.x/2.x")
            comp, k = "unet", "unet." + k  # diffusers' oldest files carry UNet keys with no prefix
        parts[comp][k[len(comp) + 1:]] = v
    for k, v in network_alphas.items():
        comp = next((c for c in COMPONENTS if k.startswith(c + ".")), "unet")
        stem = (k[len(comp) + 1:] if k.startswith(comp + ".") else k)[: -len(".alpha")]
        alphas[comp][stem if stem.endswith("down.weight") else stem + ".lora.down.weight"] = float(v)
    out = LoraFile(str(path), layout=layout)
    for comp in COMPONENTS:
        if not parts[comp]:
            continue
        keys = list(parts[comp])
        # the converters rename keys only; converting the indices tells which new key each old one became
        renamed = {peft_key: keys[i] for peft_key, i in _to_peft(comp, {k: i for i, k in enumerate(keys)}).items()}
        peft = {new: parts[comp][old] for new, old in renamed.items()}
        bad = [k for k in peft if not k.endswith((_A, _B, ".lora_A.bias", ".lora_B.bias"))]
        if bad:
            raise LoraError(f"lora: {path}: {len(bad)} entries are not plain LoRA layers (e.g. {bad[0]!r}); fastsd "
                            "fuses LoRA up/down pairs only (not DoRA, LoHa, LoKr or biases)")
        for key in [k for k in peft if k.endswith(_A)]:
            module = key[: -len(_A)]
            up = peft.get(module + _B)
            if up is None:
                raise LoraError(f"lora: {path}: {comp}.{module} has a down (A) matrix but no up (B) matrix")
            down = peft[key]
            alpha = alphas[comp].get(renamed[key])
            if alpha is None:
                alpha = _metadata_alpha(meta, comp, module)
            if comp == "text_encoder":  # one name whether the file came from transformers 4 or 5
                module = module.removeprefix("text_model.")
            out.layers[f"{comp}.{module}"] = LoraFactors(down.float(), up.float(),
                                                         float(alpha) if alpha is not None else float(down.shape[0]))
    if not out.layers:
        raise LoraError(f"lora: {path} holds no LoRA layers for a UNet or a text encoder")
    return out


# ------------------------------------------------------------------------------------------ fusing
def layer_delta(f: LoraFactors, weight_shape: torch.Size, name: str, path: str) -> torch.Tensor:
    """alpha / rank * up @ down as a tensor of the weight's shape, fp32 (conv kernels included)."""
    up, down = f.up.flatten(1), f.down.flatten(1)
    out_features, fan_in = weight_shape[0], math.prod(weight_shape[1:])
    if up.shape[1] != down.shape[0] or up.shape[0] != out_features or down.shape[1] != fan_in:
        raise LoraError(f"lora: {path}: {name} has up {tuple(f.up.shape)} and down {tuple(f.down.shape)}, which do "
                        f"not fit this model's weight {tuple(weight_shape)} (a LoRA for another architecture?)")
    return ((f.alpha / f.rank) * (up @ down)).reshape(weight_shape)


def _resolve(modules: dict[str, torch.nn.Module], layer: str) -> str | None:
    """The parameter name "<component>.<module>.weight" this model has for a LoRA layer name. Text-encoder
    names may or may not carry `text_model.` (transformers 4 has that module, transformers 5 not)."""
    comp, module = layer.split(".", 1)
    root = modules.get(comp)
    if root is None:
        return None
    candidates = [module]
    if module.startswith("text_model."):
        candidates.append(module[len("text_model."):])
    elif comp == "text_encoder":
        candidates.append("text_model." + module)
    for cand in candidates:
        try:
            sub = root.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(getattr(sub, "weight", None), torch.Tensor):
            return f"{comp}.{cand}.weight"
    return None


_PROJECTIONS = ("to_q", "to_k", "to_v")


class ModuleWeights:
    """The weights a LoRA set can touch on torch modules: read them, write them in place (`copy_`).

    Under fused QKV (kernels.apply_fused_ops on CUDA) attention reads a fused copy of to_q/to_k/to_v
    (to_qkv, to_kv) made when the ops were installed: after writing a projection, its attention's fused
    copy is refreshed (in place), or the adapters' attention deltas would change nothing."""

    def __init__(self, modules: dict[str, torch.nn.Module], check_write=None):
        self.modules = {k: v for k, v in modules.items() if v is not None}
        self.check_write = check_write  # raises when the backend cannot take new weights now

    def resolve(self, layer: str) -> str | None:
        return _resolve(self.modules, layer)

    def get(self, name: str) -> torch.Tensor:
        comp, rest = name.split(".", 1)
        return self.modules[comp].get_parameter(rest)

    @torch.no_grad()
    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.check_write is not None:
            self.check_write(list(tensors))
        for name, value in tensors.items():
            self.get(name).copy_(value)  # same storage: compiled graphs and CUDA graphs see the new values
        attns = {name.rsplit(".", 2)[0] for name in tensors if name.rsplit(".", 2)[-2] in _PROJECTIONS}
        for parent in sorted(attns):
            comp, path = parent.split(".", 1)
            kernels.refresh_fused_projections(self.modules[comp].get_submodule(path))


@dataclass
class SwitchStats:
    loras: tuple[LoraRef, ...]
    seconds: float  # restore + fuse (+ reading files not read before)
    read_seconds: float
    restored: int   # tensors put back to the base
    fused: int      # tensors written with a delta
    changed: bool

    def as_dict(self) -> dict:
        return {"loras": [str(r) for r in self.loras], "seconds": round(self.seconds, 4),
                "read_seconds": round(self.read_seconds, 4), "restored": self.restored, "fused": self.fused,
                "changed": self.changed}


class LoraSwitcher:
    """Keeps one LoRA set fused into a model's weights and switches it exactly.

    `weights` is the backend's view of its weights (ModuleWeights for torch; the ONNX Runtime backend has its
    own): resolve(layer) -> name or None, get(name) -> tensor, and either write({name: tensor}) (the tensors
    that change) or write_set(refs, {name: tensor}) (every fused tensor of the new set; the rest is base)."""

    def __init__(self, weights, *, unet_config=None, cache_files: int = 8):
        self.weights = weights
        self.unet_config = unet_config
        self.base: dict[str, torch.Tensor] = {}   # untouched copies of every tensor a LoRA ever touched
        self.fused: set[str] = set()              # tensors that hold a delta now
        self.active: tuple[LoraRef, ...] = ()
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._cache_files = cache_files
        self.switches = 0
        self.switch_seconds = 0.0

    def read(self, ref: LoraRef, allow_pickle: bool = False) -> LoraFile:
        p = Path(ref.path).expanduser()
        try:
            key = (str(p.resolve()), p.stat().st_mtime_ns)
        except OSError:
            key = (str(p), 0)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        f = read_lora(p, allow_pickle=allow_pickle, unet_config=self.unet_config)
        self._files[key] = f
        if len(self._files) > self._cache_files:
            self._files.popitem(last=False)
        return f

    def deltas(self, files: list[tuple[LoraFile, float]]) -> dict[str, torch.Tensor]:
        """Summed fp32 delta per weight name for a set; every layer must exist in the model and fit."""
        out: dict[str, torch.Tensor] = {}
        for f, scale in files:
            missing = []
            for layer, factors in f.layers.items():
                name = self.weights.resolve(layer)
                if name is None:
                    missing.append(layer)
                    continue
                base = self.base.get(name)
                shape = base.shape if base is not None else self.weights.get(name).shape
                d = layer_delta(factors, shape, layer, f.path) * scale
                out[name] = out[name] + d if name in out else d
            if missing:
                raise LoraError(f"lora: {f.path}: {len(missing)} of its {len(f.layers)} layers are not in this model "
                                f"(e.g. {missing[0]!r}); is it for another architecture?")
        return out

    def set(self, loras, *, allow_pickle: bool = False) -> SwitchStats:
        """Make `loras` ([(path, scale), ...]; [] for none) the fused set. Everything is read and checked
        before any weight changes, so a bad file leaves the current set in place."""
        refs = as_refs(loras)
        t0 = time.perf_counter()
        if refs == self.active:
            return SwitchStats(refs, 0.0, 0.0, 0, 0, False)
        files = [(self.read(r, allow_pickle), r.scale) for r in refs]
        t_read = time.perf_counter() - t0
        deltas = self.deltas(files)
        for name in deltas:
            if name not in self.base:
                self.base[name] = self.weights.get(name).detach().clone()
        restore = {n: self.base[n] for n in self.fused - set(deltas)}
        fused = {}
        for name, d in deltas.items():
            b = self.base[name]
            fused[name] = (b.float() + d.to(b.device)).to(b.dtype)
        if hasattr(self.weights, "write_set"):  # a backend that builds its state from the whole set (ONNX Runtime)
            self.weights.write_set(refs, fused)
        else:
            self.weights.write({**restore, **fused})
        self.fused = set(deltas)
        self.active = refs
        dt = time.perf_counter() - t0
        self.switches += 1
        self.switch_seconds += dt
        log.info("lora: %s (%d tensors fused, %d restored) in %.3f s", ", ".join(map(str, refs)) or "none",
                 len(fused), len(restore), dt)
        return SwitchStats(refs, dt, t_read, len(restore), len(fused), True)

    def describe(self) -> dict:
        return {"active": [str(r) for r in self.active], "fused_tensors": len(self.fused),
                "switches": self.switches, "switch_seconds": round(self.switch_seconds, 4)}
