"""A deployment's spec: what `fastsd serve` was asked for, written once to NAME/spec.json and read by
every process of the deployment (supervisor, load balancer, replicas, REST gateway, page, metrics
exporter), by `fastsd status`/`stop` and by clients.

It is typed, and checked once when read (`DeploymentSpec.read`): a file that is not what fastsd writes
is a ServingError naming the field, instead of a KeyError in some child process's log. spec.json
carries a `version` (SPEC_VERSION); a file without one was written before versions existed and is
read as version 1 (keys that fastsd no longer knows are ignored there); a newer version is refused,
since a newer fastsd wrote it. Standard library only, like folders.py.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .admission import default_max_queue
from .errors import ServingError
from .folders import NAME_RE, read_json, write_json
from .ports import DEFAULT_PORT
from .request import Limits

SPEC_VERSION = 1
SPEC_FILE = "spec.json"


@dataclass
class ReplicaPlacement:
    """Where one replica runs, as `fastsd serve` laid it out (records.plan_replicas)."""
    index: int
    host: str   # the address the load balancer and clients reach it at
    port: int
    bind: str   # the address it listens on
    local: bool = True  # on this machine; else started over ssh (--hostfile)
    cuda_visible_devices: int | str | None = None
    host_replicas: int = 1  # replicas on its host, sharing its memory (batch_size.py)
    host_memory_bytes: int | None = None  # the host's available memory at `fastsd serve`; None: measured by the replica


@dataclass
class DeploymentSpec:
    name: str
    model: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # the load balancer; replica i listens on port + 1 + i (MII's layout)
    replicas: list[ReplicaPlacement] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # OptimizeConfig fields (checked by the replica that builds it)
    random_weights: bool = False
    config: str | None = None
    allow_pickle: bool = False
    rest_port: int | None = None
    ui_port: int | None = None
    metrics_port: int | None = None
    max_batch: int | str = "auto"  # images per engine call, or "auto" (batch_size.py)
    max_batch_limit: int = 8
    batch_min_gain: float = 0.10
    batch_probe_steps: int = 2
    batch_window_ms: float = 20.0
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None
    max_body_bytes: int = 1 << 20
    log_format: str = "text"
    ssh_config: str | None = None
    token_required: bool = False  # the token itself travels in the environment, never in a file
    created_at: float = 0.0
    lora_dir: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, scale) fused for requests that name none
    max_queue: int | None = None  # requests allowed to wait beyond those running; None: admission.default_max_queue
    tls_cert: str | None = None  # PEM files: HTTPS for REST, TLS for gRPC on --host (control.py)
    tls_key: str | None = None
    vae_tiny: str | None = None  # an AutoencoderTiny folder every replica decodes (and encodes) with
    version: int = SPEC_VERSION

    @property
    def max_images_per_call(self) -> int:
        """The most images one engine call may take: --max-batch, or with auto its --max-batch-limit."""
        return self.max_batch_limit if self.max_batch == "auto" else self.max_batch

    @property
    def queue_limit(self) -> int:
        """--max-queue, or its default (admission.default_max_queue)."""
        return self.max_queue if self.max_queue is not None else \
            default_max_queue(len(self.replicas), self.max_images_per_call)

    def local_ports(self) -> list[int]:
        """Every port a process of the deployment listens on here."""
        return [self.port, *[r.port for r in self.replicas if r.local],
                *[p for p in (self.rest_port, self.ui_port, self.metrics_port) if p]]

    # -- the file --------------------------------------------------------------------------------------
    @classmethod
    def read(cls, ddir: Path) -> DeploymentSpec | None:
        """The spec in deployment folder `ddir`; None when it has none. Raises ServingError when the
        file is not a spec this fastsd can read."""
        path = Path(ddir) / SPEC_FILE
        if not path.exists():
            return None
        data = read_json(path)
        if data is None:
            raise ServingError(f"{path}: not a readable JSON file")
        return cls.from_dict(data, str(path))

    def write(self, ddir: Path) -> None:
        write_json(Path(ddir) / SPEC_FILE, self.to_dict())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = SPEC_FILE) -> DeploymentSpec:
        if not isinstance(data, dict):
            raise ServingError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)  # written since version 1; a file without it is version 1
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ServingError(f"{where}: version: got {version!r}; expected a positive integer")
        if version > SPEC_VERSION:
            raise ServingError(f"{where}: spec version {version} was written by a newer fastsd; this one reads "
                               f"versions up to {SPEC_VERSION} (use the fastsd that started the deployment)")
        spec = _conform(cls, data, where, ignore_unknown="version" not in data)
        if not NAME_RE.match(spec.name):
            raise ServingError(f"{where}: name: got {spec.name!r}; expected a deployment name")
        if isinstance(spec.max_batch, str) and spec.max_batch != "auto":
            raise ServingError(f"{where}: max_batch: got {spec.max_batch!r}; expected auto or a number of images")
        spec.version = SPEC_VERSION
        return spec


def _conform(kind, value, where: str, ignore_unknown: bool = False):
    """`value` (decoded JSON) as an instance of `kind` (a type annotation), or ServingError naming where."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, types.UnionType) or origin is typing.Union:
        for k in args:
            try:
                return _conform(k, value, where)
            except ServingError:
                continue
        raise _refuse(where, value, " or ".join(_name(k) for k in args))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise _refuse(where, value, "an object")
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = [k for k in value if k not in fields]
        if unknown and not ignore_unknown:
            raise ServingError(f"{where}: unknown key {unknown[0]!r}")
        missing = [n for n, f in fields.items() if n not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ServingError(f"{where}: {missing[0]} is missing")
        return kind(**{k: _conform(hints[k], v, f"{where}: {k}") for k, v in value.items() if k in fields})
    if origin is list:
        if not isinstance(value, list):
            raise _refuse(where, value, "a list")
        return [_conform(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _refuse(where, value, "a list")
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(items) != len(value):
            raise _refuse(where, value, f"a list of {len(items)}")
        return tuple(_conform(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(items, value)))
    if kind is type(None):
        if value is None:
            return None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (str, bool, dict):
        if isinstance(value, kind):
            return value
    else:
        raise TypeError(f"spec field type {kind!r} has no check")  # a field added without one: fail in tests
    raise _refuse(where, value, _name(kind))


def _name(kind) -> str:
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _refuse(where: str, value, expected: str) -> ServingError:
    shown = repr(value)
    return ServingError(f"{where}: got {shown if len(shown) <= 80 else shown[:80] + '...'}; expected {expected}")
