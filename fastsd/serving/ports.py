"""Ports and addresses of a deployment's servers: is a port free, does it answer, which address a
local client dials. gRPC servers set SO_REUSEPORT, so "free" is checked more strictly than a bind."""
from __future__ import annotations

import errno
import os
import random
import socket
import time
from pathlib import Path

from .errors import ServingError

DEFAULT_PORT = 50050  # MII's default port_number
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with socket.create_connection((dial, port), timeout=timeout):
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


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else host
