"""The REST gateway's shared HTTP layer: what every route on it inherits (`POST /score` in rest.py, and
any other format mounted on the same app, e.g. OpenAI's or A1111's).

A route does, in order (rest.py's /score is the example):

    gw.check_token(request)                       # 401 unless the bearer token matches (when one is set)
    seconds = gw.deadline(request)                # the request's deadline: X-Request-Timeout or --timeout, the smaller
    with gw.admit():                              # shed or admit: 429 (503 with no replica up) with Retry-After
        body = await gw.read_body(request)        # 413 over --max-body-bytes, 408 when it trickles past BODY_TIMEOUT
        ...parse with request.py...
        reply = await gw.generate(request, prompts, negatives, seconds=seconds, **parameters)

and raises `HttpError` for any refusal; `gw.respond_error(request, e)` turns it into the one error body
(rest.py's middleware does it for every route: a route may simply raise):

    {"error": "<a plain message>", "request_id": "<the X-Request-ID>", ...}  (+ "parameter" for 422)

Messages are plain and fixed per status: no gRPC text, no addresses, no exception text, no paths (a
replica's INVALID_ARGUMENT reason is fastsd's own message naming the parameter, and is passed on).
Status codes: 400 body not the format, 401 token, 408 body too slow, 413 body too large, 422 a value (or
a header) out of range, 429 at capacity, 499 the client closed the connection (logged; nobody reads it),
500 the deployment failed, 501 not served, 503 no replica up or the load balancer gone, 504 the deadline
passed. 429 and 503 carry `Retry-After` (seconds, from the measured service rate).

`generate` runs the call in a thread pool with the request's deadline as its gRPC deadline, watches the
connection, and cancels the call when the client goes away: the load balancer and the replica then stop
working on it (the engine at its next denoising step).
"""
from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import InvalidParameter
from .admission import Admission
from .client import DeploymentClient
from .control import bearer, same
from .errors import PLAIN_MESSAGES, DeploymentError, plain_message
from .folders import cache_path, read_json
from .spec import DeploymentSpec

TIMEOUT_HEADER = "x-request-timeout"
BODY_TIMEOUT = 30.0   # seconds to receive a whole body once its headers are in
CLIENT_CLOSED = 499   # nginx's code for "client closed request"
# gRPC status of the deployment's answer -> HTTP status; any other is 500
HTTP_STATUS = {"DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501,
               "CANCELLED": CLIENT_CLOSED}


class HttpError(Exception):
    """A refusal with its HTTP status, plain message, extra body fields and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


def from_deployment_error(e: DeploymentError, seconds: float | None = None) -> HttpError:
    """The deployment's gRPC status -> the HTTP refusal, with a plain message (never gRPC's own text)."""
    if e.code == "INVALID_ARGUMENT":  # fastsd's own message: "<parameter>: got ...; allowed: ..."
        return HttpError(422, str(e), parameter=str(e).split(":", 1)[0])
    status, message = HTTP_STATUS.get(e.code, 500), plain_message(e)
    if e.code == "DEADLINE_EXCEEDED" and seconds is not None:
        message += f" ({seconds:g} s)"
    headers = {"Retry-After": str(e.retry_after or 1)} if status in (429, 503) else None
    return HttpError(status, message, headers)


def request_deadline(header: str | None, server_timeout: float) -> float:
    """Seconds the request may take: the client's X-Request-Timeout when given and smaller, else the
    deployment's --timeout. InvalidParameter (HTTP 422) for a value that is not a positive number."""
    if header is None or header.strip() == "":
        return server_timeout
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameter("X-Request-Timeout", header, "a positive number of seconds")
    return min(value, server_timeout)


class Gateway:
    """One per REST gateway process: the deployment's client, a thread pool, the token and admission."""

    def __init__(self, spec: DeploymentSpec, token: str | None, client: DeploymentClient | None = None):
        self.spec = spec
        self.token = token
        self.client = client or DeploymentClient(spec.name)
        self.admission = Admission(spec.max_images_per_call, spec.queue_limit)
        # a worker per admitted request (each waits on its gRPC call), and a few for image URLs
        self.pool = ThreadPoolExecutor(max_workers=self.admission.limit(len(spec.replicas)) + 8,
                                       thread_name_prefix="deployment-call")
        self._up = (0.0, len(spec.replicas))

    def respond_error(self, request, e: HttpError):
        """The one error body: {"error": message, "request_id": id, ...extra}, with the error's headers."""
        from starlette.responses import JSONResponse  # lazy: the web framework, only in the gateway process
        return JSONResponse({"error": e.message, "request_id": getattr(request.state, "request_id", None), **e.extra},
                            status_code=e.status, headers=e.headers or None)

    # -- the steps of a route --------------------------------------------------------------------------
    def check_token(self, request) -> None:
        if self.token and not same(bearer(request.headers.get("authorization")), self.token):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": "Bearer"})

    def deadline(self, request) -> float:
        """The request's deadline in seconds from now (X-Request-Timeout, capped by --timeout)."""
        try:
            return request_deadline(request.headers.get(TIMEOUT_HEADER), self.spec.limits.timeout)
        except InvalidParameter as e:
            raise HttpError(422, str(e), parameter=e.name) from None

    def replicas_up(self) -> int:
        """Replicas the load balancer sees up (its balancer.json, read at most twice a second)."""
        at, up = self._up
        if time.monotonic() - at > 0.5:
            seen = (read_json(cache_path() / self.spec.name / "balancer.json") or {}).get("up")
            up = sum(bool(u) for u in seen) if isinstance(seen, list) else len(self.spec.replicas)
            self._up = (time.monotonic(), up)
        return up

    def admit(self):
        """Shed or admit, before the body is read: a context manager for an admitted request, else
        HttpError 429 (503 with no replica up) with Retry-After."""
        up = self.replicas_up()
        if not self.admission.try_admit(up):
            status, code = (429, "RESOURCE_EXHAUSTED") if up else (503, "UNAVAILABLE")
            message = PLAIN_MESSAGES[code]
            raise HttpError(status, message, {"Retry-After": str(self.admission.retry_after(up))})
        return _Ticket(self.admission)

    async def read_body(self, request) -> bytes:
        """The body, at most --max-body-bytes (413), within BODY_TIMEOUT seconds (408)."""
        limit = self.spec.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HttpError(413, f"the body is larger than {limit} bytes", limit=limit)
        body = bytearray()

        async def read():
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise HttpError(413, f"the body is larger than {limit} bytes", limit=limit)
        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s") from None
        return bytes(body)

    async def run(self, fn, *args, **kwargs):
        """A blocking function (image URL fetches, PNG encoding) in the gateway's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def generate(self, request, prompts, negatives=None, *, seconds: float, **kwargs):
        """One deployment call with the request's deadline; cancelled when the client disconnects
        (HttpError 499). Refusals come back as HttpError with a plain message."""
        cancel = threading.Event()
        call = self.run(self.client.generate, prompts, negatives, timeout=seconds, cancel=cancel,
                        request_id=getattr(request.state, "request_id", None), **kwargs)
        watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
        try:
            return await call
        except DeploymentError as e:
            if cancel.is_set():
                raise HttpError(CLIENT_CLOSED, "the client closed the connection") from None
            raise from_deployment_error(e, seconds) from None
        finally:
            watcher.cancel()


class _Ticket:
    def __init__(self, admission: Admission):
        self.admission = admission

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.admission.release(answered=kind is None)
        return False


async def _watch_disconnect(request, cancel: threading.Event) -> None:
    """Sets `cancel` when the client goes away (ASGI's http.disconnect, once the body has been read)."""
    try:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                cancel.set()
                return
    except (asyncio.CancelledError, RuntimeError):
        return
