"""What every route on the REST gateway shares (`POST /score` in rest.py, openai_api.py, a1111_api.py): the
token check, the body read under the deployment's byte limit and a time limit, and one generation call
with the request's deadline, load shedding and cancellation. A generation takes the fields of
request.parse_query (every value checked by the one table, schema.py), fetches allowed image URLs, and goes
to the deployment through its one client (client.DeploymentClient) from the gateway's thread pool, so it
gets the same deadline, batching, request id, metrics and access-log line whatever the route.

A route does:

    gw.check_token(request)                # 401 unless the token matches (when one is set)
    body = await gw.body(request)          # 413 over --max-body-bytes, 408 when it trickles past BODY_TIMEOUT
    query = gw.query(fields)               # 422 naming the field
    reply = await gw.generate(request, query)

`generate` is, in order: the request's deadline (`deadline`: X-Request-Timeout or --timeout, the smaller),
shed or admit (`admit`: 429, or 503 with no replica up, both with Retry-After from the measured service
rate), the call with that deadline as its gRPC deadline, cancelled when the client disconnects (499 in the
access log; the load balancer and the replica stop working on it, the engine at its next denoising step).
Every failure is an ApiError with the HTTP status and a plain message: no gRPC text, addresses, exception
text or paths (a refused value's message is fastsd's own, naming the parameter). Each API writes it in its
own error shape; `/score`'s is {"error": "...", "request_id": "...", ...} (`score_error`).

The runtime behind the routes is the gateway's business, not the routes': `Gateway` talks to an MII
deployment (its load balancer through `client`, its files for health, progress and interrupts); a subclass
with another `client` (anything with DeploymentClient.generate's signature, answering DeploymentError) and
its own `health`, `readiness`, `admit`, `collector`, `interrupt` and `furthest_progress` serves the
same routes from another runtime (Ray Serve: serving/ray/ingress.py).
Statuses: 400 not the format, 401 token, 408 body too slow, 409 interrupted (A1111's /interrupt), 413 body
too large, 422 a value or header out of range, 429 at capacity, 499 the client closed the connection, 500 the
deployment failed, 501 not served, 503 no replica up or the load balancer gone, 504 the deadline passed.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import math
import threading
import time
from dataclasses import dataclass, field

from ..errors import InvalidParameter
from . import logs
from .admission import Admission
from .client import DeploymentClient, DeploymentReply
from .errors import PLAIN_MESSAGES, DeploymentError, plain_message
from . import progress as progress_files
from .folders import cache_path, read_json
from .image_urls import fetch_cells
from .loras import LoraCatalog
from .metrics import DeploymentCollector
from .ports import port_answers
from .request import Limits, Query, parse_query
from .spec import DeploymentSpec

TIMEOUT_HEADER = "x-request-timeout"
BODY_TIMEOUT = 30.0   # seconds to receive a whole body once its headers are in
CLIENT_CLOSED = 499   # nginx's code for "client closed request"
# gRPC status of the deployment's answer -> HTTP status; any other is 500
HTTP_STATUS = {"INVALID_ARGUMENT": 422, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429,
               "UNIMPLEMENTED": 501, "ABORTED": 409,  # ABORTED: interrupted (progress.py)
               "CANCELLED": CLIENT_CLOSED}
RETRY_AFTER_S = 1  # told on a 429 or 503 that carries no measured Retry-After


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None    # the request field at fault
    headers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more fields of /score's error body (e.g. "limit")

    def __post_init__(self):
        super().__init__(self.message)
        if self.status in (429, 503):
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")


def invalid(e: InvalidParameter, param: str | None = None, status: int = 422) -> ApiError:
    return ApiError(status, str(e), param or e.name)


def from_deployment_error(e: DeploymentError, seconds: float | None = None) -> ApiError:
    """The deployment's gRPC status -> the HTTP refusal, with a plain message (never gRPC's own text)."""
    status, message = HTTP_STATUS.get(e.code, 500), plain_message(e)
    if e.code == "INVALID_ARGUMENT":  # fastsd's own message: "<parameter>: got ...; allowed: ..."
        return ApiError(422, message, message.split(":", 1)[0])
    if e.code == "DEADLINE_EXCEEDED" and seconds is not None:
        message += f" ({seconds:g} s)"
    headers = {"Retry-After": str(e.retry_after)} if status in (429, 503) and e.retry_after else {}
    return ApiError(status, message, headers=headers)


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


def score_error(e: ApiError, request_id: str | None):
    """`/score`'s error body: {"error": message, "request_id": id, "parameter"?, ...extra}."""
    from starlette.responses import JSONResponse  # lazy: the web framework, only in the gateway process
    body = {"error": e.message, "request_id": request_id, **({"parameter": e.param} if e.param else {}), **e.extra}
    return JSONResponse(body, status_code=e.status, headers=e.headers or None)


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Gateway:
    """One deployment as the routes see it. `client` and `pool` are the REST gateway's own; `pool` should
    have a worker for every request `admission` lets in (`workers`)."""

    def __init__(self, spec: DeploymentSpec, client: DeploymentClient, pool, token: str | None):
        self.spec, self.client, self.pool, self.token = spec, client, pool, token
        self.limits: Limits = spec.limits
        self.admission = Admission(spec.max_images_per_call, spec.queue_limit)
        self._up = (0.0, len(spec.replicas))

    @staticmethod
    def workers(spec: DeploymentSpec) -> int:
        """Threads the gateway's pool needs: one per request it admits, and a few for image URLs."""
        return Admission(spec.max_images_per_call, spec.queue_limit).limit(len(spec.replicas)) + 8

    @property
    def folder(self):
        """The deployment's folder (the replicas' progress files, the interrupt)."""
        return cache_path() / self.spec.name

    @property
    def model_id(self) -> str:
        """The one model a deployment serves, as `fastsd serve --model` named it."""
        return self.spec.model

    def loras(self) -> LoraCatalog | None:
        """The deployment's --lora-dir, read now (files added later are offered); None without one."""
        if not self.spec.lora_dir:
            return None
        try:
            return LoraCatalog(self.spec.lora_dir)
        except InvalidParameter:
            return None

    # -- the runtime, as the routes ask about it -----------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        """Liveness: the load balancer answers."""
        ok = port_answers(self.spec.port, self.spec.host, 0.5)
        return ok, {"status": "ok" if ok else "unavailable", "deployment": self.spec.name}

    def readiness(self) -> tuple[bool, dict]:
        """Readiness: the load balancer answers and its health checks see at least one replica serving."""
        n = len(self.spec.replicas)
        lb = port_answers(self.spec.port, self.spec.host, 0.5)
        seen = read_json(self.folder / "balancer.json") or {}
        health = seen.get("health") or [{"state": "unknown"}] * n
        up = [bool(u) for u in (seen.get("up") or [False] * n)]
        ok = lb and any(up)
        return ok, {"status": "ready" if ok else "not ready", "deployment": self.spec.name, "load_balancer": lb,
                    "replicas_up": sum(up), "replicas": len(up), "replica_states": [h.get("state") for h in health]}

    def collector(self):
        """The deployment's own figures for /metrics (a prometheus_client collector), or None."""
        return DeploymentCollector(self.spec.name)

    def interrupt(self) -> None:
        """Every engine call running now stops at its next step (A1111's /interrupt)."""
        progress_files.interrupt(self.folder)

    def furthest_progress(self) -> dict | None:
        """The busy replica furthest along ({"step", "steps", "started"}; progress.furthest), or None."""
        return progress_files.furthest(self.folder, len(self.spec.replicas))

    # -- the door -------------------------------------------------------------------------------------
    def check_token(self, request) -> None:
        """With --token: `Authorization: Bearer TOKEN`, or HTTP basic auth with the token as password (any
        user name: A1111's clients, webuiapi's set_auth included, send basic auth)."""
        if not self.token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        if not (given and hmac.compare_digest(given.encode(errors="replace"), self.token.encode())):
            raise ApiError(401, "missing or wrong token (Authorization: Bearer <token>)")

    async def body(self, request) -> bytes:
        """The request body, refused (413) past the deployment's --max-body-bytes as it streams in, and
        (408) when it has not all arrived within BODY_TIMEOUT seconds."""
        limit = self.spec.max_body_bytes
        too_large = ApiError(413, f"the body is larger than {limit} bytes (fastsd serve --max-body-bytes)",
                             extra={"limit": limit})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        body = bytearray()

        async def read():
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_large
        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s") from None
        return bytes(body)

    def deadline(self, request) -> float:
        """The request's deadline in seconds from now (X-Request-Timeout, capped by --timeout)."""
        try:
            return request_deadline(request.headers.get(TIMEOUT_HEADER), self.limits.timeout)
        except InvalidParameter as e:
            raise invalid(e) from None

    def replicas_up(self) -> int:
        """Replicas the load balancer sees up (its balancer.json, read at most twice a second)."""
        at, up = self._up
        if time.monotonic() - at > 0.5:
            seen = (read_json(self.folder / "balancer.json") or {}).get("up")
            # no file yet: the load balancer has not said; the call goes on and it answers
            up = sum(bool(u) for u in seen) if isinstance(seen, list) else max(1, len(self.spec.replicas))
            self._up = (time.monotonic(), up)
        return up

    def admit(self):
        """Shed or admit: a context manager for an admitted request, else ApiError 429 (503 with no replica
        up) with Retry-After, at once."""
        up = self.replicas_up()
        if not self.admission.try_admit(up):
            status, code = (429, "RESOURCE_EXHAUSTED") if up else (503, "UNAVAILABLE")
            raise ApiError(status, f"{PLAIN_MESSAGES[code]} ({code})",
                           headers={"Retry-After": str(self.admission.retry_after(up))})
        return _Ticket(self.admission)

    # -- one generation ---------------------------------------------------------------------------------
    def query(self, fields: dict, params: dict | None = None) -> Query:
        """parse_query's fields -> the checked Query; InvalidParameter -> 422 naming the field (`params`
        renames schema fields to the API's own names in the error)."""
        try:
            return parse_query(fields, self.limits)
        except InvalidParameter as e:
            name = (params or {}).get(e.name, e.name)
            message = f"{name} ({str(e)}" .replace(":", "):", 1) if name != e.name else str(e)
            raise ApiError(422, message, name) from None

    async def run(self, fn, *args, **kwargs):
        """A blocking function (PNG encoding, ...) in the gateway's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def generate(self, request, query: Query) -> DeploymentReply:
        """The request's deadline, shed or admit, then the call; cancelled when the client disconnects."""
        seconds = self.deadline(request)
        info = request.state.info
        kw = query.parameters
        info.update(prompts=len(query.prompts), steps=kw.get("num_inference_steps", "default"),
                    size=logs.size(kw.get("width"), kw.get("height")))
        with self.admit():
            cancel = threading.Event()
            watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
            try:
                reply = await self.run(self._call, request.state.request_id, query, seconds, cancel)
            finally:
                watcher.cancel()
        info.update(images=len(reply.images), queue_ms=reply.queue_ms, engine_ms=reply.engine_ms)
        return reply

    def _call(self, request_id: str, query: Query, seconds: float, cancel: threading.Event) -> DeploymentReply:
        end = time.monotonic() + seconds
        images = {"image": query.image, "mask_image": query.mask_image}
        if self.limits.image_url_allow:  # allowed URLs are fetched here, before the request is queued
            try:
                images = fetch_cells(images, self.limits.max_image_bytes, self.limits.image_url_timeout)
            except InvalidParameter as e:
                raise invalid(e) from None
        try:  # image-to-image is MII's InpaintingReply without masks
            return self.client.generate(query.prompts, query.negatives, image=images["image"] or None,
                                        mask_image=images["mask_image"], request_id=request_id,
                                        timeout=end - time.monotonic(), cancel=cancel, **query.parameters)
        except DeploymentError as e:
            if cancel.is_set():
                raise ApiError(CLIENT_CLOSED, "the client closed the connection") from None
            raise from_deployment_error(e, seconds) from None


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
