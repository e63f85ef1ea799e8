"""What travels beside a request between the deployment's processes, and the guard on what arrives.

- Metadata: the request id (`x-request-id`, the same name as the HTTP header; made here when the
  caller sent none), the probe marker (`fastsd-probe`: the deployment's own readiness checks, kept
  out of every request count), and the replica's timings in its trailing metadata (queue wait,
  engine time, images), which the load balancer reads for its access log and latency histograms; a
  refused call's Retry-After (`fastsd-retry-after`), and a control call's stop key (`fastsd-stop-key`).
- `guarded`: a gRPC handler whose request deserializer never raises. gRPC answers a message that
  does not parse (invalid UTF-8 in a string, a truncated field) with INTERNAL; a raw caller's
  malformed bytes are a bad request, so they become INVALID_ARGUMENT with the reason.
"""
from __future__ import annotations

import re
import uuid

REQUEST_ID = "x-request-id"
PROBE = "fastsd-probe"
QUEUE_MS, ENGINE_MS, IMAGES = "fastsd-queue-ms", "fastsd-engine-ms", "fastsd-images"
_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def request_id(given: str | None) -> str:
    """The caller's id when it is a sane token (it is echoed in headers and logs), else a new one."""
    if isinstance(given, str) and _ID_RE.match(given):
        return given
    return uuid.uuid4().hex


def metadata(context) -> dict:
    try:
        return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - metadata is advisory
        return {}


def trailing(context) -> dict:
    try:
        return {k: v for k, v in (context.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001
        return {}


def millis(text):
    """A timing from the trailing metadata as a number, or "-" when the replica sent none."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return "-"


class Undecodable:
    """A request whose bytes are not the method's message."""

    def __init__(self, error: Exception):
        self.error = error


def guarded(handler_fn, request_deserializer, response_serializer, on_refused=None):
    """A unary-unary handler around `handler_fn(request, context)` that refuses undecodable bytes
    (and calls `on_refused(context)` first, for the caller's counts)."""
    import grpc

    def deserialize(data):
        try:
            return request_deserializer(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's
            return Undecodable(e)

    def handle(request, context):
        if isinstance(request, Undecodable):
            if on_refused is not None:
                on_refused(context)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request: not a valid message for this method ({type(request.error).__name__}: "
                          f"{str(request.error)[:120]})")
        return handler_fn(request, context)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=deserialize,
                                               response_serializer=response_serializer)


def guard_interceptor(may_terminate=None):
    """A server interceptor that puts `guarded` around every unary-unary method, and obeys MII's
    Terminate only when `may_terminate(metadata)` says so (the stop key, control.py): PERMISSION_DENIED
    otherwise, and also when no `may_terminate` is given."""
    import grpc

    class Guard(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            h = continuation(handler_call_details)
            if h is None or h.unary_unary is None:
                return h
            inner = h.unary_unary
            if handler_call_details.method.rsplit("/", 1)[-1] == "Terminate":
                def inner(request, context, _terminate=h.unary_unary):
                    if may_terminate is None or not may_terminate(metadata(context)):
                        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                      "Terminate needs the deployment's stop key: use `fastsd stop NAME`")
                    return _terminate(request, context)
            return guarded(inner, h.request_deserializer, h.response_serializer)

    return Guard()


RETRY_AFTER = "fastsd-retry-after"  # trailing metadata of a refused call: seconds before trying again
STOP_KEY = "fastsd-stop-key"  # metadata of a control call (Terminate): the deployment's stop key (control.py)


def seconds(text):
    """A Retry-After from the trailing metadata as whole seconds, or None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return max(1, int(value + 0.999)) if value == value and value < 1e9 else None
