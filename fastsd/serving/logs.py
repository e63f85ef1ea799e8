"""Logging for every serving process: plain text lines, or one JSON object per line for log
collectors (`fastsd serve --log-format json`, python-json-logger's formatter), and the access log:
one line per request (logger `fastsd.access`) with its id, task, size, steps, images, status and
times, written by the process that answers the caller (the load balancer for gRPC, the REST
gateway for HTTP)."""
from __future__ import annotations

import logging
import sys

FORMATS = ("text", "json")
ACCESS = logging.getLogger("fastsd.access")


def setup(component: str, fmt: str = "text") -> None:
    """Configures the root logger of a serving process (`component`: balancer, replica-0, rest, ...)."""
    handler = logging.StreamHandler(sys.stdout)  # the supervisor sends it to the process's log file
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level"},
                                           static_fields={"component": component}))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def access(**fields) -> None:
    """One access-log line: `key=value ...` as text; in JSON each field is a key of its own."""
    text = " ".join(f"{k}={_word(v)}" for k, v in fields.items())
    ACCESS.info("access %s", text, extra={"access": fields})


def size(width, height) -> str:
    """WIDTHxHEIGHT as asked; "native" for a side left to the model's own size."""
    if width is None and height is None:
        return "native"
    return f"{width if width is not None else 'native'}x{height if height is not None else 'native'}"


def _word(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    s = str(v)
    return s if s and " " not in s else repr(s)
