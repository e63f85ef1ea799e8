"""What a user's module looks like at a call, for the drop-in: one walk over its submodules.

fastsd never changes a user's module; it runs a compute copy of it (compute.py) and keeps that copy in step
with what the user does to the module through diffusers. `look(module)` says what that is:

- hooks: submodules with torch forward hooks, a diffusers hook registry (`enable_layerwise_casting`,
  `apply_layer_skip`, caches, group offloading), an accelerate hook (`enable_model_cpu_offload`) or a
  `forward` replaced on the instance. Hooks act on the user's module and only there: a call with them runs
  the user's module itself.
- processors: the attention processor of every diffusers `Attention`, by the module's name.
- settings: the plain attributes (bool, int, float, str, None, and short lists and str-keyed dicts of
  them) of every submodule: FreeU's factors on the up blocks, the VAE's slicing and tiling switches and tile
  sizes, peft's adapter scaling and active adapters, IP-Adapter scales, GLIGEN's fuser switch,
  feed-forward chunking, train/eval.
- structure (the submodules, by identity), a fingerprint of the weights, their dtype and device: what a
  compute copy is converted from, so that a change (a LoRA loaded or fused, `pipe.to(...)`) rebuilds it.
- grads: autograd would reach the module's parameters (a call under `torch.enable_grad()` with
  parameters that require grad): only the user's own module can give them their gradients.
- odd: parameter dtypes the copy cannot compute from (float8 storage)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PLAIN = (bool, int, float, str, type(None))
_PLAIN_TYPES = frozenset(PLAIN)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# torch's own bookkeeping in every module's __dict__ (parameters, buffers, submodules, hook tables): not settings
_TORCH_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}


def is_setting(v) -> bool:
    """A plain value, or a short list/tuple of them, or a short dict of them by str keys."""
    if isinstance(v, PLAIN):
        return True
    if isinstance(v, (list, tuple)):
        return len(v) <= 64 and all(isinstance(x, PLAIN) for x in v)
    if isinstance(v, dict):
        return len(v) <= 64 and all(isinstance(k, str) and isinstance(x, PLAIN) for k, x in v.items())
    return False


def copy_setting(v):
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v


@dataclass
class Look:
    names: list  # the submodules' names ("" is the module), in named_modules order
    modules: list  # the submodules themselves
    hooks: list  # "name: what" for each hooked submodule
    processors: dict  # Attention name -> its processor
    settings: dict  # submodule name -> {attribute: plain value}
    structure: tuple  # the ids of the submodules
    weights: torch.Tensor | None  # a fingerprint of sampled values of every parameter
    dtype: torch.dtype  # of the first floating parameter (float32 when there is none)
    device: torch.device
    grads: bool
    odd: list  # parameter dtypes other than the floating ones

    def key(self) -> tuple:
        """What a compute copy depends on: a different key means the copy is stale."""
        return self.structure, self.dtype, self.device

    def same_weights(self, other: "Look") -> bool:
        a, b = self.weights, other.weights
        return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                             and torch.equal(a, b))


def _settings(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if k in _TORCH_INTERNALS:
            continue
        t = type(v)
        if t in _PLAIN_TYPES or ((t is list or t is tuple or t is dict) and is_setting(v)):
            out[k] = v
    return out


def _hook(sub, own: tuple) -> str | None:
    d = sub.__dict__
    if d.get("_forward_hooks") or d.get("_forward_pre_hooks"):
        return "torch forward hooks"
    registry = d.get("_diffusers_hook")
    if registry is not None and getattr(registry, "hooks", None):
        return "diffusers hooks (" + ", ".join(registry.hooks) + ")"
    if "_hf_hook" in d:
        return "an accelerate hook (model CPU offload?)"
    forward = d.get("forward")
    if forward is not None and not any(forward is o for o in own):
        return "its forward replaced on the instance"
    return None


def look(module: torch.nn.Module, own: tuple = (), weights: bool = True) -> Look:
    """The module as it is now. `own`: fastsd's own instance overrides on it (not counted as hooks).
    weights=False skips the fingerprint (when only hooks and settings matter)."""
    from diffusers.models.attention_processor import Attention

    names, mods, hooks, processors, settings = [], [], [], {}, {}
    for name, sub in module.named_modules():
        names.append(name)
        mods.append(sub)
        why = _hook(sub, own)
        if why:
            hooks.append(f"{name or type(module).__name__}: {why}")
        if isinstance(sub, Attention):
            processors[name] = sub.processor
        settings[name] = _settings(sub.__dict__)
    dtype, device, grads, odd, samples = None, None, False, [], []
    for p in module.parameters():
        if p.dtype in FLOATS:
            if dtype is None:
                dtype, device = p.dtype, p.device
        elif str(p.dtype) not in odd:
            odd.append(str(p.dtype))
        grads = grads or p.requires_grad
        if weights:  # two values of each tensor: in-place changes through .data (peft's merge) bump no version
            samples.append(p.detach().reshape(-1)[:2] if p.dtype in FLOATS else torch.zeros(2, device=p.device))
    if device is None:
        b = next(module.buffers(), None)
        device = b.device if b is not None else torch.device("cpu")
    return Look(names, mods, hooks, processors, settings, tuple(id(m) for m in mods),
                torch.cat(samples).float().cpu() if samples else None,
                dtype or torch.float32, device,
                grads and torch.is_grad_enabled(), odd)


def changed_settings(before: dict, now: dict) -> list[str]:
    """'module.attribute' for each setting that differs between two looks' settings (added ones too)."""
    out = []
    for name, attrs in now.items():
        old = before.get(name, {})
        out += [f"{name}.{k}" if name else k for k, v in attrs.items()
                if (old[k] != v if k in old else v is not None)]  # a setting added as None changes nothing
    return out


FREEU = ("s1", "s2", "b1", "b2")


def describe_settings(changed: list[str]) -> str:
    """A reason for people: FreeU named as such, other settings listed (the first few)."""
    freeu = [c for c in changed if c.rsplit(".", 1)[-1] in FREEU]
    rest = [c for c in changed if c not in freeu]
    parts = (["FreeU is on"] if freeu else []) + ([", ".join(rest[:4]) + (", ..." if len(rest) > 4 else "")
                                                   + " changed"] if rest else [])
    return "; ".join(parts)
