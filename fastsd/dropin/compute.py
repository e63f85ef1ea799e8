"""The compute copy: what the drop-in runs in place of one of the user's modules (a UNet, a ControlNet, the VAE).

The user's module is never changed: its dtype, device, weights, attention processors and config stay as the
user set them, so `pipe.unet.dtype`, `attn_processors`, `set_attn_processor`, `save_pretrained` and every
other diffusers API see diffusers' own module. fastsd computes with a copy of it:

- in the compute dtype (`compute_dtype`): the profile's where the user's module is in full precision
  (fp32), the module's own otherwise; same dtype and no memory-format change: the copy shares the user's
  weight tensors (no memory), else it holds converted ones;
- with the torch recipe installed on it (backends/torch/recipe.py: fastsd's attention kernels, fused ops,
  channels_last);
- kept in step with the user's module at every call (`sync`): its attention processors (fastsd's kernel
  takes the stock ones it reproduces, `takes`; any other processor, PAG's, a custom one, runs in the copy
  for its own module, and IP-Adapter's are copied with their weights), and its settings (watch.py: FreeU,
  VAE slicing and tiling, LoRA scaling and active adapters, ...);
- rebuilt when what it was converted from changed (`stale`): other submodules (LoRA adapters loaded, QKV
  fused), other weights (a LoRA fused, weights loaded), another dtype or device (`pipe.to(...)`)."""
from __future__ import annotations

import copy as copying
import itertools
import logging

import torch

from ..backends.torch import recipe
from ..kernels import FastSDAttnProcessor
from .watch import FLOATS, Look, copy_setting

log = logging.getLogger("fastsd")

# diffusers' processors that compute plain attention, as fastsd's kernel does: with the user's dtype fastsd
# takes only the default one (AttnProcessor2_0, SDPA: the same numbers bit for bit); at a lower compute
# precision any of them (their differences are float rounding, far below the profile's tolerance)
EXACT_TAKES = ("AttnProcessor2_0",)
LOWER_TAKES = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "FusedAttnProcessor2_0",
               "XFormersAttnProcessor")


def compute_dtype(wanted: torch.dtype, user: torch.dtype) -> torch.dtype:
    """The dtype fastsd computes a module in: the config's where the user's module is fp32, else the module's
    own (a profile never changes the precision a user chose for a half-precision pipeline)."""
    return wanted if user == torch.float32 else user


def takes(processor, exact: bool) -> bool:
    """Whether fastsd's attention kernel computes what `processor` computes (at the copy's precision)."""
    if isinstance(processor, FastSDAttnProcessor):
        return True
    name = type(processor).__name__
    if type(processor).__module__ != "diffusers.models.attention_processor":
        return False
    if name == "XFormersAttnProcessor" and getattr(processor, "attention_op", None) is not None:
        return False
    return name in (EXACT_TAKES if exact else LOWER_TAKES)


def _converted(user: torch.nn.Module, dtype: torch.dtype, convert: bool, own: dict) -> torch.nn.Module:
    """A copy of `user` (its submodules copied, our instance overrides left out) whose floating parameters
    and buffers are `dtype` copies (convert=True) or the user's own tensors (convert=False)."""
    memo = {}
    for t in itertools.chain(user.parameters(), user.buffers()):
        if convert and t.dtype in FLOATS:
            data = t.detach().to(dtype=dtype, copy=True)
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else data
        else:
            memo[id(t)] = t
    saved = {k: user.__dict__.pop(k) for k, v in own.items() if user.__dict__.get(k) is v}
    try:
        return copying.deepcopy(user, memo)
    finally:
        user.__dict__.update(saved)


class ComputeCopy:
    """One converted copy of a user's module with the recipe installed (see the module's docstring)."""

    def __init__(self, user: torch.nn.Module, role: str, config, seen: Look, *, attention: str, wanted: torch.dtype,
                 cpu_recipe: bool, own: dict):
        self.role, self.device = role, seen.device
        self.dtype = compute_dtype(wanted, seen.dtype)
        self.exact = self.dtype == seen.dtype
        self.seen, self.key = seen, seen.key()
        # the CPU recipe's channels_last only on a copy converted anyway: a bf16 pipeline shares its weights
        prec = recipe.Precision(self.dtype, self.dtype, self.dtype,
                                cpu_recipe and self.dtype == torch.bfloat16 and not self.exact)
        convert = not self.exact or recipe.channels_last(role, config, prec)
        self.module = _converted(user, self.dtype, convert, own)
        self.shares_weights = not convert
        by_name = dict(self.module.named_modules())  # before the recipe: fused ops switch classes, not objects
        self.by_name = by_name
        self.copied = {n: by_name[n].processor for n in seen.processors}  # nn.Module ones hold converted weights
        self.attention, fused, cl = recipe.install_module(self.module, role, config, self.device, prec,
                                                          attention=attention, fuse_qkv=False)
        self.applied = [*fused, *(["channels_last"] if cl else [])]
        self.slicing = config.attention_slicing == "on"
        self._fastsd: dict = {}
        self._processors = None
        self._settings = {n: {k: copy_setting(v) for k, v in a.items()} for n, a in seen.settings.items()}
        if role == "vae" and config.vae_tiling == "on":
            self.module.enable_tiling()
        self.sync(seen)
        fn = type(self.module).forward.__get__(self.module)
        # no inductor weight freezing (the engine freezes): a copy is rebuilt when the user's weights change
        self.forward = torch.compile(fn) if config.compile and role != "vae" else fn

    def stale(self, now: Look) -> bool:
        """The user's module is no longer what this copy was converted from."""
        return now.key() != self.key or not now.same_weights(self.seen)

    def sync(self, now: Look) -> bool:
        """The user's attention processors and settings, as they are now, onto the copy. True when anything
        changed (what a captured CUDA graph of the copy computes is then stale)."""
        changed = False
        ids = tuple(id(p) for p in now.processors.values())
        if ids != self._processors:
            for name, p in now.processors.items():
                self.by_name[name].set_processor(self._processor(name, p))
            changed = self._processors is not None
            self._processors = ids
        for name, attrs in now.settings.items():
            target, seen = self.by_name.get(name), self._settings.setdefault(name, {})
            if target is None:
                continue
            for k, v in attrs.items():
                if k not in seen or seen[k] != v:
                    setattr(target, k, copy_setting(v))
                    seen[k] = copy_setting(v)
                    changed = True
        return changed

    def _processor(self, name: str, user_processor):
        if takes(user_processor, self.exact):
            slice_size = getattr(user_processor, "slice_size", None)
            if slice_size is None and self.slicing:
                slice_size = max(1, self.by_name[name].sliceable_head_dim // 2)
            return self._kernel(slice_size)
        if isinstance(user_processor, torch.nn.Module):  # IP-Adapter's, ...: the copy's, with converted weights
            return self.copied[name]
        return user_processor  # weightless (PAG's, a custom one): runs in the copy for this module

    def _kernel(self, slice_size):
        p = self._fastsd.get(slice_size)
        if p is None:
            # fp32 scores for fp16 (SD 2.x overflows), except at the user's own precision, where diffusers'
            # AttnProcessor2_0 does not upcast either
            upcast = self.dtype == torch.float16 and not self.exact
            p = self._fastsd[slice_size] = FastSDAttnProcessor(self.attention, upcast=upcast, slice_size=slice_size)
        return p

    def describe(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "attention": self.attention,
                "applied": list(self.applied), "shares_weights": self.shares_weights}
