"""What `fastsd.accelerate` keeps on an accelerated pipeline (`pipe._fastsd_accelerate`): the config, the
wrapped modules with their compute copies, the backend's runners, and which path each call took."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..optimize import OptimizeConfig
from .compute import ComputeCopy, compute_dtype
from .watch import Look

log = logging.getLogger("fastsd")


@dataclass
class Wrapped:
    """One of the user's modules whose calls fastsd routes (its methods shadowed on the instance)."""
    role: str  # unet | controlnet | vae
    what: str  # for people: "UNet", "ControlNet", "VAE"
    module: torch.nn.Module
    start: Look  # the module when it was accelerated (what a runner's graph was exported from)
    wanted: torch.dtype  # the dtype the config asks for (compute.compute_dtype decides)
    own: dict = field(default_factory=dict)  # method name -> fastsd's override on the instance
    previous: dict = field(default_factory=dict)  # method name -> the instance attribute it shadowed
    copy: ComputeCopy | None = None

    def original(self, name: str):
        """The user's own method: an instance override that was there before ours (a hook), else the class's."""
        prev = self.previous.get(name)
        return prev if prev is not None else getattr(type(self.module), name).__get__(self.module)

    def install(self, name: str, fn) -> None:
        if name in self.module.__dict__:
            self.previous[name] = self.module.__dict__[name]
        self.module.__dict__[name] = fn  # an instance attribute shadows the class's method
        self.own[name] = fn

    def uninstall(self) -> None:
        """Take fastsd's overrides off (where a later hook wrapped one, the hook keeps it: it then calls the
        user's method, as the pipeline is no longer accelerated)."""
        for name, fn in self.own.items():
            if self.module.__dict__.get(name) is fn:
                if name in self.previous:
                    self.module.__dict__[name] = self.previous[name]
                else:
                    del self.module.__dict__[name]
        self.copy = None


@dataclass
class AccelerateState:
    """What `accelerate` did to a pipeline; `describe()` for people."""
    config: OptimizeConfig
    attention: str
    cpu_recipe: bool
    wrapped: list = field(default_factory=list)
    untouched: dict = field(default_factory=dict)  # role -> dtype of the modules fastsd leaves alone (text encoder)
    applied: list = field(default_factory=list)
    runners: dict = field(default_factory=dict)  # "unet"/"vae_decoder" -> module runner
    graph_factory: object = None  # fn -> kernels.CUDAGraphRunner, when CUDA graphs are on
    graphs: object = None  # the CUDAGraphRunner over the UNet's compute copy
    active: bool = True
    logged: set = field(default_factory=set)
    calls: dict = field(default_factory=lambda: {"runner": 0, "graph": 0, "torch": 0, "plain": 0})  # UNet calls
    routes: Counter = field(default_factory=Counter)  # (what, path) -> calls, every wrapped module

    def note(self, what: str, reason: str, level: int = logging.WARNING) -> None:
        """Log, once per (what, reason), why a call did not take the fastest path."""
        if (what, reason) not in self.logged:
            self.logged.add((what, reason))
            log.log(level, "fastsd.accelerate: %s %s", what, reason)

    def count(self, w: Wrapped, path: str) -> None:
        """path: runner (a backend's graph), graph (CUDA graph), torch (the compute copy), plain (the user's
        own module, untouched)."""
        self.routes[(w.what, path)] += 1
        if w.role == "unet":
            self.calls[path] += 1

    def describe(self) -> dict:
        copies = {w.what: w.copy.describe() for w in self.wrapped if w.copy is not None}
        dtypes = {w.role: str(w.copy.dtype if w.copy is not None else compute_dtype(w.wanted, w.start.dtype))
                  .replace("torch.", "") for w in self.wrapped}
        dtypes.update({role: str(d).replace("torch.", "") for role, d in self.untouched.items()})
        return {"device": self.config.device, "dtypes": dtypes, "attention": self.attention,
                "applied": list(self.applied), "backend": self.config.backend, "copies": copies,
                "runners": {k: r.describe() for k, r in self.runners.items()}, "calls": dict(self.calls),
                "routes": {f"{what} {path}": n for (what, path), n in sorted(self.routes.items())}}
