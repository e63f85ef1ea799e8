"""The arguments of the Ray Serve application (`build_app(args)`), checked once, before anything deploys.

`serve run fastsd.serving.ray:build_app model=fastsd-shapes num_replicas=2` hands every value over as
text; a `serve deploy` config (or `serve.run(build_app({...}))`) may give numbers and a `ray_actor_options`
mapping. Both are read here into `RayAppConfig`; a value that is not allowed is an InvalidParameter naming
the argument and what it may be (one line). Standard library and fastsd only: no Ray, no torch.

    model                    preset, hub id, local folder or .safetensors file (required)
    name                     the deployment's name in logs and error bodies (default: fastsd)
    profile, dtype, device   the engine, as `fastsd generate --profile/--dtype/--device` (default exact, cpu
                             unless the replica asks for GPUs)
    lora_dir                 folder of LoRA .safetensors files requests may name (`lora`); it must exist on
                             every node (shared storage, or the same files baked into the image)
    num_replicas             a fixed number of engine replicas (default 1), or autoscaling with
    min_replicas, max_replicas, target_ongoing_requests
    max_batch                images per engine call (@serve.batch; default 4); batch_wait_ms (default 20)
    max_ongoing_requests     requests one engine replica holds at once (default 2 x max_batch)
    max_queued_requests      requests waiting for an engine replica beyond those; more get HTTP 429 with
                             Retry-After at once (default 8 x max_batch; -1 for no limit)
    num_cpus, num_gpus       each engine replica's Ray resources (or ray_actor_options: {num_cpus, num_gpus});
                             the ingress asks for none
    threads                  torch threads per engine replica (default: torch's)
    timeout                  seconds per request, queueing included (default 300; X-Request-Timeout can
                             only shorten it)
    max_body_bytes           HTTP body limit (default 1 MiB)
    token                    the bearer token every route but the probes requires (default: $FASTSD_TOKEN
                             in the ingress's environment; none when both are empty)
    random_weights           true: the model's architecture with random weights (tests)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ...errors import InvalidParameter
from ..folders import NAME_RE
from ..request import Limits
from ..spec import DeploymentSpec

ENGINE, INGRESS = "FastSDEngine", "FastSDIngress"  # the application's two deployments (app.py)

REPLICA_ARGS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests")
ARGS = ("model", "name", "profile", "dtype", "device", "lora_dir", *REPLICA_ARGS, "max_batch", "batch_wait_ms",
        "max_ongoing_requests", "max_queued_requests", "ray_actor_options", "num_cpus", "num_gpus", "threads",
        "timeout", "max_body_bytes", "token", "random_weights")
ACTOR_OPTIONS = ("num_cpus", "num_gpus")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _int(name: str, value, low: int, high: int | None = None) -> int:
    try:
        n = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < low or (high is not None and n > high):
        span = f"{low}..{high}" if high is not None else f"at least {low}"
        raise InvalidParameter(name, value, f"an integer, {span}")
    return n


def _float(name: str, value, low: float, allow_low: bool = True) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x < low or (x == low and not allow_low):
        raise InvalidParameter(name, value, f"a number {'>=' if allow_low else '>'} {low:g}")
    return x


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise InvalidParameter(name, value, "true or false")


@dataclass
class RayAppConfig:
    model: str
    name: str = "fastsd"
    profile: str = "exact"
    dtype: str | None = None
    device: str = "auto"
    lora_dir: str | None = None
    num_replicas: int | None = 1
    autoscaling: dict | None = None  # min_replicas, max_replicas, target_ongoing_requests
    max_batch: int = 4
    batch_wait_ms: float = 20.0
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    actor_options: dict = field(default_factory=lambda: {"num_cpus": 1})
    threads: int | None = None
    timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    token: str | None = None
    random_weights: bool = False

    @classmethod
    def from_args(cls, args: dict) -> RayAppConfig:
        if not isinstance(args, dict):
            raise InvalidParameter("args", args, "a mapping of argument names to values")
        unknown = sorted(k for k in args if k not in ARGS)
        if unknown:
            raise InvalidParameter(unknown[0], args[unknown[0]], f"a known argument: {', '.join(ARGS)}")
        a = {k: v for k, v in args.items() if v is not None}
        model = a.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidParameter("model", model, "a preset, hub id, local folder or .safetensors file")
        cfg = cls(model=model.strip())
        name = str(a.get("name", cfg.name))
        if not NAME_RE.fullmatch(name):
            raise InvalidParameter("name", name, "letters, digits, '.', '_' and '-' (a deployment name)")
        cfg.name = name
        for key in ("profile", "dtype", "device", "lora_dir", "token"):
            if key in a:
                if not isinstance(a[key], str):
                    raise InvalidParameter(key, a[key], "text")
                setattr(cfg, key, a[key] or None if key in ("dtype", "lora_dir", "token") else a[key])
        if cfg.lora_dir and not os.path.isdir(os.path.expanduser(cfg.lora_dir)):
            raise InvalidParameter("lora_dir", cfg.lora_dir, "an existing folder of LoRA .safetensors files (on "
                                                             "every node, this one included)")
        cfg._replicas(a)
        if "max_batch" in a:
            cfg.max_batch = _int("max_batch", a["max_batch"], 1, 64)
        if "batch_wait_ms" in a:
            cfg.batch_wait_ms = _float("batch_wait_ms", a["batch_wait_ms"], 0.0)
        if "max_ongoing_requests" in a:
            cfg.max_ongoing_requests = _int("max_ongoing_requests", a["max_ongoing_requests"], 1)
        if "max_queued_requests" in a:
            n = _int("max_queued_requests", a["max_queued_requests"], -1)
            if n == 0:
                raise InvalidParameter("max_queued_requests", a["max_queued_requests"],
                                       "an integer, at least 1, or -1 for no limit")
            cfg.max_queued_requests = n
        cfg._actor_options(a)
        if "threads" in a:
            cfg.threads = _int("threads", a["threads"], 1, 1024)
        if "timeout" in a:
            cfg.timeout = _float("timeout", a["timeout"], 0.0, allow_low=False)
        if "max_body_bytes" in a:
            cfg.max_body_bytes = _int("max_body_bytes", a["max_body_bytes"], 1024)
        if "random_weights" in a:
            cfg.random_weights = _bool("random_weights", a["random_weights"])
        cfg.engine()  # profile, dtype and device are checked here, before anything deploys
        return cfg

    def _replicas(self, a: dict) -> None:
        auto = [k for k in REPLICA_ARGS[1:] if k in a]
        if auto and "num_replicas" in a:
            raise InvalidParameter("num_replicas", a["num_replicas"], f"left out with autoscaling ({', '.join(auto)})")
        if not auto:
            self.num_replicas = _int("num_replicas", a.get("num_replicas", 1), 1, 1024)
            return
        low = _int("min_replicas", a.get("min_replicas", 1), 0, 1024)
        high = _int("max_replicas", a.get("max_replicas", max(1, low)), max(1, low), 1024)
        target = _float("target_ongoing_requests", a.get("target_ongoing_requests", 2), 0.0, allow_low=False)
        self.num_replicas = None
        self.autoscaling = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}

    def _actor_options(self, a: dict) -> None:
        given = a.get("ray_actor_options", {})
        if not isinstance(given, dict):
            raise InvalidParameter("ray_actor_options", given, "a mapping with num_cpus and/or num_gpus")
        unknown = sorted(k for k in given if k not in ACTOR_OPTIONS)
        if unknown:
            raise InvalidParameter("ray_actor_options", unknown[0], "num_cpus or num_gpus")
        opts = dict(self.actor_options)
        for key in ACTOR_OPTIONS:
            for where, value in ((f"ray_actor_options.{key}", given.get(key)), (key, a.get(key))):
                if value is not None:
                    opts[key] = _float(where, value, 0.0)
        self.actor_options = {k: (int(v) if float(v).is_integer() else v) for k, v in opts.items()}

    # -- what the deployments get ----------------------------------------------------------------------
    @property
    def gpus(self) -> bool:
        return bool(self.actor_options.get("num_gpus"))

    def engine(self) -> dict:
        """OptimizeConfig's fields for every engine replica (the device is resolved on the replica: a GPU
        replica runs on the GPU Ray gives it)."""
        from ...optimize import OptimizeConfig  # lazy: torch, which `serve build` and the ingress do without
        device = "cuda" if self.gpus and self.device == "auto" else self.device
        flags = {"dtype": self.dtype} if self.dtype else {}
        config = OptimizeConfig.from_profile(self.profile, device=device, **flags)
        try:
            config.validated()  # the flags' checks; the device is resolved and checked where the replica runs
        except InvalidParameter as e:
            if e.name != "device" or device == "cpu":  # a GPU the builder's machine does not have is no error
                raise
        return {**config.__dict__, "device": device}

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch

    @property
    def queued(self) -> int:
        return self.max_queued_requests or 8 * self.max_batch

    def spec(self) -> DeploymentSpec:
        """The deployment as the shared HTTP layer and the engine replicas read it (never written to disk)."""
        import time
        return DeploymentSpec(name=self.name, model=self.model, engine=self.engine(),
                              random_weights=self.random_weights, max_batch=self.max_batch,
                              limits=Limits(timeout=self.timeout), threads=self.threads,
                              max_body_bytes=self.max_body_bytes, token_required=bool(self.token),
                              created_at=time.time(), lora_dir=self.lora_dir, batch_window_ms=self.batch_wait_ms)
