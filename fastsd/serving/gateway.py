"""What the HTTP APIs mounted on the REST gateway share (openai_api.py, a1111_api.py): the token check,
the body read under the deployment's byte limit, and one generation call. A generation takes the fields
of request.parse_query (every value checked by the one table, schema.py), fetches allowed image URLs,
and goes to the deployment through its one client (client.DeploymentClient) from the gateway's thread
pool, so it gets the same deadline, batching, request id, metrics and access-log line as `POST /score`.

Every failure is an ApiError with the HTTP status; each API writes it in its own error shape.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
from dataclasses import dataclass, field

from ..errors import InvalidParameter
from . import logs
from .client import DeploymentClient, DeploymentReply
from .errors import DeploymentError
from .folders import cache_path
from .image_urls import fetch_cells
from .loras import LoraCatalog
from .request import Limits, Query, parse_query
from .spec import DeploymentSpec

# gRPC status of the deployment's answer -> HTTP status (as /score answers them); any other is 500
HTTP_STATUS = {"INVALID_ARGUMENT": 422, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429,
               "UNIMPLEMENTED": 501, "ABORTED": 409}  # ABORTED: interrupted (progress.py)
RETRY_AFTER_S = 1  # told to callers on 429 and 503 (the openai client and most others honour Retry-After)


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None    # the request field at fault
    headers: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__init__(self.message)
        if self.status in (429, 503):
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")


def invalid(e: InvalidParameter, param: str | None = None, status: int = 422) -> ApiError:
    return ApiError(status, str(e), param or e.name)


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Gateway:
    """One deployment as the APIs see it. `client` and `pool` are the REST gateway's own."""

    def __init__(self, spec: DeploymentSpec, client: DeploymentClient, pool, token: str | None):
        self.spec, self.client, self.pool, self.token = spec, client, pool, token
        self.limits: Limits = spec.limits

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
        """The request body, refused (413) past the deployment's --max-body-bytes as it streams in."""
        limit = self.spec.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"the body is larger than {limit} bytes (fastsd serve --max-body-bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body is larger than {limit} bytes (fastsd serve --max-body-bytes)")
        return bytes(body)

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

    async def generate(self, request, query: Query) -> DeploymentReply:
        info = request.state.info
        kw = query.parameters
        info.update(prompts=len(query.prompts), steps=kw.get("num_inference_steps", "default"),
                    size=logs.size(kw.get("width"), kw.get("height")))
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self.pool, self._call, request.state.request_id, query)
        info.update(images=len(reply.images), queue_ms=reply.queue_ms, engine_ms=reply.engine_ms)
        return reply

    def _call(self, request_id: str, query: Query) -> DeploymentReply:
        images = {"image": query.image, "mask_image": query.mask_image}
        if self.limits.image_url_allow:  # allowed URLs are fetched here, before the request is queued
            try:
                images = fetch_cells(images, self.limits.max_image_bytes, self.limits.image_url_timeout)
            except InvalidParameter as e:
                raise invalid(e) from None
        try:  # image-to-image is MII's InpaintingReply without masks
            return self.client.generate(query.prompts, query.negatives, image=images["image"] or None,
                                        mask_image=images["mask_image"], request_id=request_id, **query.parameters)
        except DeploymentError as e:
            param = str(e).split(":", 1)[0] if e.code == "INVALID_ARGUMENT" else None
            raise ApiError(HTTP_STATUS.get(e.code, 500), str(e), param) from None
