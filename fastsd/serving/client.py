"""The one client of a running deployment. Every front door that talks to a deployment sends its
requests through `DeploymentClient`: `fastsd query`, the REST gateway, the web page, `fastsd batch
--deployment`, the serving benchmark and `fastsd serve`'s readiness ping. It speaks MII's own stub and
messages to the deployment's MII records (records.py: NAME for text-to-image, its image-task record
for image-to-image and inpainting).

Thread-safe: MII's `mii_query_handle` binds to the event loop current when it is made, and `query`
fails inside a running loop and across threads, so each calling thread gets its own event loop and
its own handles. gRPC errors come back as `DeploymentError` with the status name and the server's
reason (a bad value is INVALID_ARGUMENT naming the parameter), never as a traceback.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from . import wire
from .errors import DeploymentError, ServingError
from .folders import cache_path, check_name, read_json, use_cache_path
from .records import IMAGE_TASK, TEXT_TO_IMAGE, import_mii, record_name
from .spec import DeploymentSpec


@dataclass
class DeploymentReply:
    mii_reply: object               # MII's ImageResponse: it decodes its images when they are first read
    queue_ms: float | str = "-"     # the replica's timings from its trailing metadata (wire.py); "-": none sent
    engine_ms: float | str = "-"

    @property
    def images(self) -> list:
        """PIL images, prompt-major."""
        return self.mii_reply.images

    @property
    def nsfw_content_detected(self):
        """One flag per image."""
        return self.mii_reply.nsfw_content_detected


def running_spec(name: str) -> DeploymentSpec:
    """The spec of the running deployment NAME; ServingError when there is none (no spec or no MII record)."""
    check_name(name)
    ddir = cache_path() / name
    spec = DeploymentSpec.read(ddir)
    if spec is None or not (ddir / "score.py").exists():
        raise ServingError(f"no running deployment named '{name}' in {cache_path()} "
                           "(start one with `fastsd serve`; set MII_CACHE_PATH to the folder it was started with)")
    return spec


def image_request(prompts: list[str], negatives: list[str] | None, image, mask_image) -> dict:
    """The query dict MII's client packs for the InpaintingReply RPC (the image-task record): encoded
    image bytes (and mask), one for every prompt or one per prompt. Without a mask it is image-to-image:
    MII's client needs the key, so an empty list."""
    def as_list(x):
        return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
    images, masks = as_list(image), as_list(mask_image)
    if not all(isinstance(b, (bytes, bytearray)) for b in images + masks):
        raise TypeError("image and mask_image: encoded image bytes (PNG, JPEG or WebP)")  # MII packs bytes as they are
    return {"prompt": list(prompts), "negative_prompt": list(negatives) if negatives else [""] * len(prompts),
            "image": [bytes(b) for b in images], "mask_image": [bytes(b) for b in masks]}


class DeploymentClient:
    """`timeout`: seconds to wait for a reply (also sent as the call's deadline); by default the
    deployment's per-request timeout and 5 s more."""

    def __init__(self, name: str, timeout: float | None = None):
        use_cache_path()
        self.spec = running_spec(name)
        self.name = name
        import_mii()  # seconds of imports (deepspeed), paid here rather than by the first request
        self.timeout = float(timeout) if timeout is not None else self.spec.limits.timeout + 5.0
        self._local = threading.local()

    def engine(self) -> dict:
        """The engine the deployment runs, as its first replica to write it describes it (read now: empty
        until a replica is up)."""
        ddir = cache_path() / self.name
        for i in range(len(self.spec.replicas)):
            engine = (read_json(ddir / f"replica-{i}.json") or {}).get("engine") or {}
            if engine:
                return engine
        return {}

    def _handle(self, task: str):
        """This thread's MII handle for the deployment's record of `task`."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            self._local.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._local.loop)  # MII's handle binds to the loop current when it is made
            handles = self._local.handles = {}
        if task not in handles:
            handles[task] = import_mii().legacy.mii_query_handle(record_name(self.name, task))
        return handles[task]

    def generate(self, prompts: list[str], negatives: list[str] | None = None, *, image=None, mask_image=None,
                 request_id: str | None = None, probe: bool = False, **kwargs) -> DeploymentReply:
        """One request. Keyword values that are None are left out (MII's Value carries str, int, float and
        bool only). With `image` (encoded PNG, JPEG or WebP bytes: one, or one per prompt) it is
        image-to-image, with `mask_image` too inpainting, through MII's InpaintingReply. `request_id`
        travels as metadata (the deployment's logs name it); `probe` marks the deployment's own readiness
        check, which no request count includes."""
        import grpc
        from mii.legacy.method_table import GRPC_METHOD_TABLE
        if mask_image and not image:
            raise ServingError("mask_image: a mask only together with an image")
        handle = self._handle(IMAGE_TASK if image else TEXT_TO_IMAGE)
        request = (image_request(prompts, negatives, image, mask_image) if image else
                   {"prompt": list(prompts), "negative_prompt": list(negatives) if negatives else [""] * len(prompts)})
        methods = GRPC_METHOD_TABLE[handle.task]
        proto = methods.pack_request_to_proto(request, **{k: v for k, v in kwargs.items() if v is not None})
        metadata = ([(wire.REQUEST_ID, request_id)] if request_id else []) + ([(wire.PROBE, "1")] if probe else [])

        async def call():
            pending = getattr(handle.stub, methods.method)(proto, metadata=metadata, timeout=self.timeout)
            reply = await pending
            return reply, {k: v for k, v in (await pending.trailing_metadata() or ()) if isinstance(v, str)}
        try:
            proto_reply, trail = self._local.loop.run_until_complete(asyncio.wait_for(call(), self.timeout + 1))
        except grpc.aio.AioRpcError as e:
            raise DeploymentError(e.code().name, e.details() or e.code().name) from None
        except asyncio.TimeoutError:
            raise DeploymentError("DEADLINE_EXCEEDED", f"no reply within {self.timeout:g} s") from None
        return DeploymentReply(methods.unpack_response_from_proto(proto_reply), wire.millis(trail.get(wire.QUEUE_MS)),
                               wire.millis(trail.get(wire.ENGINE_MS)))
