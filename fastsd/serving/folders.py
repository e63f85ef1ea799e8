"""Where deployments live on disk, standard library only (`fastsd status`/`stop` and the supervisor
stay light).

A deployment NAME lives in `$MII_CACHE_PATH/NAME/` (MII's own layout: its `score.py`, the deployment
record that `mii.legacy.mii_query_handle(NAME)` reads, is written there), with fastsd's files beside it:

    spec.json        what `fastsd serve` was asked for (spec.py: model, ports, replicas, limits)
    state.json       written by the supervisor: its pid, every child's pid, port, restarts
    replica-I.json   written by replica I: ready, engine, counters (requests, batches, merged)
    balancer.json    written by the load balancer: counters (forwarded, failovers, per replica)
    stopping         present once a stop was asked for (by `fastsd stop` or MII's terminate)
    *.log            each process's stdout and stderr

Every JSON file is written whole (write_json), so a reader in another process never sees half of one.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ServingError

CACHE_ENV = "MII_CACHE_PATH"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def cache_path() -> Path:
    """MII's cache folder for servers and clients alike: $MII_CACHE_PATH, else ~/.cache/fastsd/mii.
    MII's client executes the score file it finds there as Python, so the folder is kept private."""
    raw = os.environ.get(CACHE_ENV) or str(Path("~/.cache/fastsd/mii").expanduser())
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def use_cache_path() -> Path:
    """Sets MII_CACHE_PATH in this process (before MII is used) so MII reads the same folder."""
    path = cache_path()
    os.environ[CACHE_ENV] = str(path)
    return path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ServingError(f"deployment name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def write_json(path: Path, data) -> None:
    """Atomic: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
