"""Who may control a deployment, and who may query it over gRPC.

- The stop key: a random secret that `fastsd serve` writes to NAME/stop.key (mode 0600, so only the
  deployment's user reads it). MII's `Terminate` (and any other control call) is obeyed only when its
  metadata carries it (`fastsd-stop-key`); without it the load balancer and the replicas answer
  PERMISSION_DENIED and change nothing. `fastsd stop NAME` (deploy.stop) reads the key and sends it, so
  `mii.legacy.terminate(NAME)`, which sends a bare Terminate, no longer stops a deployment.
- The token: with `--token` and a load balancer listening on an address other than loopback (`--host`),
  a gRPC call from any peer but loopback must carry `authorization: Bearer TOKEN`; MII's unchanged client
  keeps querying on loopback.
- TLS: `--tls-cert/--tls-key` (PEM files) put the REST gateway on HTTPS and the load balancer's
  listener on `--host` on TLS; the loopback listener MII's client dials stays plain gRPC.

Standard library only, except `server_credentials` (grpc).
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from ..errors import InvalidParameter
from . import wire

STOP_KEY_FILE = "stop.key"
LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "unix:")


def create_stop_key(ddir: Path) -> str:
    """A new stop key in ddir/stop.key, readable by this user only."""
    key = secrets.token_urlsafe(32)
    path = Path(ddir) / STOP_KEY_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def read_stop_key(ddir: Path) -> str | None:
    try:
        return (Path(ddir) / STOP_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def same(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; nothing matches a missing secret."""
    if not expected or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(errors="replace"), expected.encode())


def may_control(metadata: dict, key: str | None) -> bool:
    """A control call (Terminate) carries the deployment's stop key."""
    return same(metadata.get(wire.STOP_KEY), key)


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header or metadata value."""
    scheme, _, token = (value or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def is_loopback_peer(peer: str | None) -> bool:
    """gRPC's context.peer() names a caller on this machine's loopback."""
    return bool(peer) and peer.startswith(LOOPBACK_PEERS)


def may_query(metadata: dict, peer: str | None, token: str | None) -> bool:
    """A gRPC query is allowed: no token is set, it comes over loopback, or it carries the token."""
    return not token or is_loopback_peer(peer) or same(bearer(metadata.get("authorization")), token)


def check_tls(cert: str | None, key: str | None) -> None:
    """Both files or neither, both readable; InvalidParameter naming the option otherwise."""
    if (cert is None) != (key is None):
        raise InvalidParameter("--tls-cert" if cert is None else "--tls-key", None,
                               "both --tls-cert and --tls-key (PEM files), or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise InvalidParameter(flag, path, "a readable PEM file")


def server_credentials(cert: str, key: str):
    import grpc
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
