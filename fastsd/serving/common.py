"""What every serving process shares: where a deployment lives on disk, its spec and state files,
port and process checks. Standard library only, so `fastsd status`/`stop` and the supervisor stay
light (no torch, no deepspeed).

A deployment NAME lives in `$MII_CACHE_PATH/NAME/` (MII's own layout: its `score.py`, the deployment
record that `mii.legacy.mii_query_handle(NAME)` reads, is written there), with fastsd's files beside it:

    spec.json        what `fastsd serve` was asked for (model, ports, replicas, limits)
    state.json       written by the supervisor: its pid, every child's pid, port, restarts
    replica-I.json   written by replica I: ready, engine, counters (requests, batches, merged)
    balancer.json    written by the load balancer: counters (forwarded, failovers, per replica)
    stopping         present once a stop was asked for (by `fastsd stop` or MII's terminate)
    *.log            each process's stdout and stderr
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from ..errors import FastSDError

CACHE_ENV = "MII_CACHE_PATH"
TOKEN_ENV = "FASTSD_TOKEN"
PARENT_ENV = "FASTSD_SUPERVISOR_PID"
WATCH_STDIN_ENV = "FASTSD_WATCH_STDIN"
DEFAULT_PORT = 50050  # MII's default port_number
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServingError(FastSDError):
    """A deployment that cannot be started, found, queried or stopped as asked."""


# -- paths -----------------------------------------------------------------------------------------
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


def deployment_dir(name: str) -> Path:
    return cache_path() / check_name(name)


# -- json files ------------------------------------------------------------------------------------
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


# -- processes -------------------------------------------------------------------------------------
def pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def pid_cmdline(pid) -> str:
    try:
        return Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ours(pid, ddir: Path) -> bool:
    """True when `pid` is alive and is a fastsd serving process of deployment `ddir` (its command
    line names the folder), so a recycled pid is never signalled."""
    return pid_alive(pid) and str(ddir) in pid_cmdline(pid)


def signal_pid(pid, sig) -> bool:
    try:
        os.kill(int(pid), sig)
        return True
    except (ProcessLookupError, PermissionError, TypeError, ValueError):
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    """Waits until every pid has exited; returns those still alive at the timeout."""
    end = time.monotonic() + timeout
    left = [p for p in pids if p]
    while left and time.monotonic() < end:
        left = [p for p in left if pid_alive(p)]
        if left:
            time.sleep(0.05)
    return [p for p in left if pid_alive(p)]


# -- ports -----------------------------------------------------------------------------------------
def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with socket.create_connection((connect_host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """No one listens on the port. Checked two ways, because gRPC servers set SO_REUSEPORT and a
    second one could otherwise share a port silently: nothing answers a connection, and an exclusive
    bind (no SO_REUSEPORT) of the same address succeeds."""
    if port_answers(port, host, timeout=0.3):
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = host if host not in ("localhost",) else "127.0.0.1"
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR (as every server sets it) so connections in TIME_WAIT do not count; on Linux it
        # still fails while any socket listens there, SO_REUSEPORT or not, since this one lacks it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((bind_host, port))
        return True
    except OSError as e:
        return e.errno not in (errno.EADDRINUSE, errno.EACCES)
    finally:
        s.close()


def free_port_block(count: int, start: int = 20000, end: int | None = None, host: str = "127.0.0.1") -> int:
    """A base port such that base .. base+count-1 are all free (for tests and benchmarks). Below the
    kernel's ephemeral range by default, where outgoing connections would take a port meanwhile."""
    import random
    if end is None:
        try:
            end = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            end = 32768
        end = max(end, start + 1000)
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(start, end - count)
        if all(port_free(base + i, host) for i in range(count)):
            return base
    raise ServingError(f"no block of {count} free ports found")


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else host


# -- the parent watch ----------------------------------------------------------------------------
def watch_parent(on_orphan, interval: float = 1.0) -> None:
    """Children of a supervisor end themselves when it is gone (killed with -9, say), so no server
    outlives its deployment. A replica on another host (started over ssh, FASTSD_WATCH_STDIN=1)
    watches its stdin instead: the supervisor holds the other end of it through ssh, and it reaches
    end-of-file when the ssh session ends (supervisor stopped or killed, connection lost)."""
    import threading
    if os.environ.get(WATCH_STDIN_ENV) == "1":
        def read_to_eof():
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            on_orphan()
        threading.Thread(target=read_to_eof, name="ssh-watch", daemon=True).start()
        return
    expected = int(os.environ.get(PARENT_ENV) or 0)
    if not expected:
        return

    def loop():
        while True:
            time.sleep(interval)
            if os.getppid() != expected:
                on_orphan()
                return
    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def graceful_signals(stop) -> None:
    """SIGTERM and SIGINT call `stop()` (in the main thread)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


# -- histograms in the stats files ----------------------------------------------------------------
# Counts per bucket kept in the JSON stats files that `fastsd status` and the metrics exporter
# (metrics.py, prometheus_client) both read, so the two cannot disagree. Standard library only:
# the replicas and the balancer write them without importing prometheus_client.
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64)


def hist_new(bounds) -> dict:
    """Upper bounds, then one count per bucket (the last one is +Inf), the sum and the count."""
    return {"bounds": list(bounds), "counts": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0}


def hist_observe(h: dict, value: float) -> None:
    i = next((k for k, b in enumerate(h["bounds"]) if value <= b), len(h["bounds"]))
    h["counts"][i] += 1
    h["sum"] += value
    h["count"] += 1
