"""Slow and greedy clients against the REST gateway's HTTP server (uvicorn, h11).

uvicorn waits for a request's headers as long as bytes keep coming (its keep-alive timer is reset by
every byte), and accepts connections until the process runs out of file descriptors, after which
asyncio logs an accept error in a loop. So the gateway runs uvicorn with `GuardedH11Protocol`:
- headers must be complete within HEADER_TIMEOUT seconds of the connection (or of the previous
  response, on a kept-alive connection), else the connection is closed; the body has its own timeout
  (gateway.BODY_TIMEOUT);
- at most `max_connections()` connections at once, well below the file-descriptor limit (raised to
  its hard limit at start); at the limit a new connection closes the oldest one still waiting for its
  headers (a slow client, not a request in progress), or is itself closed when there is none, so a
  health check still gets in while slow clients hold every slot;
- an idle kept-alive connection is closed after KEEP_ALIVE_S (`server_config` sets both for the gateway);
- every such refusal is logged at most once per second (`RateLimited`, with a count of the lines left
  out), and so are asyncio's and uvicorn's own error lines.
"""
from __future__ import annotations

import logging
import resource
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0
# An idle kept-alive connection is closed after this many seconds (uvicorn's default, named so clients and the
# load test can see it). Keep it under HEADER_TIMEOUT: the header timer also runs while a connection idles.
# A client that sends just as the server closes gets a reset (the HTTP/1.1 keep-alive race): clients that
# idle longer than KEEP_ALIVE_S - 1 should open a new connection, or retry a reset once.
KEEP_ALIVE_S = 5.0
MAX_CONNECTIONS = 1024
log = logging.getLogger("fastsd.serving.slowloris")


def max_connections() -> int:
    """Raises this process's file-descriptor limit to its hard limit; the connection limit below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ValueError, OSError):
            pass
    return max(16, min(MAX_CONNECTIONS, soft - 128))  # room for logs, sockets to the deployment, image URLs


class RateLimited(logging.Filter):
    """Lets a message through at most once per `interval` seconds per (logger, message template); the
    next one that passes says how many were left out."""

    def __init__(self, interval: float = 1.0):
        super().__init__()
        self.interval = interval
        self.last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        at, dropped = self.last.get(key, (-1e9, 0))
        if now - at < self.interval:
            self.last[key] = (at, dropped + 1)
            return False
        self.last[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {now - at:.0f} s not logged)"
        return True


def install_log_limits() -> None:
    limit = RateLimited()
    for name in ("asyncio", "uvicorn.error", log.name):
        logging.getLogger(name).addFilter(limit)


def server_config(app, host: str, port: int, **kw):
    """The gateway's uvicorn settings: this module's protocol and keep-alive, a 5 s graceful shutdown."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S, http=GuardedH11Protocol, **kw)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection limit (module doc)."""
    limit = MAX_CONNECTIONS  # set by the gateway from max_connections()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.limit:
            waiting = [c for c in self.connections if c is not self and getattr(c, "_waiting_since", None) is not None]
            victim = min(waiting, key=lambda c: c._waiting_since) if waiting else self
            log.warning("%d connections, the limit: closing %s", len(self.connections),
                        "the oldest one still sending its headers" if victim is not self else "a new one")
            victim._drop()
            if victim is self:
                return
        self._await_headers()

    def _await_headers(self) -> None:
        self._waiting_since = time.monotonic()
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        if getattr(self, "_waiting_since", None) is not None:
            log.warning("closed a connection whose request headers did not arrive within %g s", HEADER_TIMEOUT)
            self._drop()

    def _drop(self) -> None:
        self._waiting_since = None
        self._cancel_header_timer()
        self.connections.discard(self)
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are in
            self._waiting_since = None
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_headers()  # the next request on a kept-alive connection (a pipelined one disarms it)
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._waiting_since = None
        self._cancel_header_timer()
        super().connection_lost(exc)
