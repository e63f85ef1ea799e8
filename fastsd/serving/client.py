"""The one client of a running deployment. Every front door that talks to a deployment sends its
requests through `DeploymentClient`: `fastsd query`, the REST gateway, the web page, `fastsd batch
--deployment`, the serving benchmark and `fastsd serve`'s readiness ping. It speaks MII's own service
and messages (proto.py) to the deployment's load balancer, as MII's client does, without importing
MII's package (torch, deepspeed): the REST gateway that uses it stays a light process.

Thread-safe: one gRPC channel, shared by every thread. Each call has a deadline (`timeout`: the
deployment's per-request timeout and 5 s more by default) that travels with it, so the load balancer
and the replica stop working on it when it passes, and a caller that goes away can cancel it
(`cancel`, a threading.Event). gRPC errors come back as `DeploymentError` with the status name, the
server's reason (a bad value is INVALID_ARGUMENT naming the parameter) and, for a busy deployment,
the seconds after which to retry, never as a traceback.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from . import proto, wire
from .errors import DeploymentError, ServingError
from .folders import cache_path, check_name, read_json, use_cache_path
from .ports import LOOPBACK, connect_host, grpc_address
from .spec import DeploymentSpec

CANCEL_POLL = 0.05  # seconds between looks at a caller's cancel event


@dataclass
class DeploymentReply:
    mii_reply: proto.ImageReply     # MII's reply as MII's client returns it: images decoded when first read
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
        self.timeout = float(timeout) if timeout is not None else self.spec.limits.timeout + 5.0
        # the load balancer also listens on loopback (MII's client dials localhost), in plain gRPC
        host = connect_host(self.spec.host) if self.spec.host in LOOPBACK else "127.0.0.1"
        self.address = grpc_address(host, self.spec.port)
        self._lock = threading.Lock()
        self._channel = None
        self._stubs = {}

    def engine(self) -> dict:
        """The engine the deployment runs, as its first replica to write it describes it (read now: empty
        until a replica is up)."""
        ddir = cache_path() / self.name
        for i in range(len(self.spec.replicas)):
            engine = (read_json(ddir / f"replica-{i}.json") or {}).get("engine") or {}
            if engine:
                return engine
        return {}

    def _stub(self, method: str):
        import grpc
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.address, options=proto.MESSAGE_OPTIONS)
            if method not in self._stubs:
                self._stubs[method] = proto.stub(self._channel, method)
            return self._stubs[method]

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._stubs = None, {}

    def generate(self, prompts: list[str], negatives: list[str] | None = None, *, image=None, mask_image=None,
                 request_id: str | None = None, probe: bool = False, timeout: float | None = None,
                 cancel: threading.Event | None = None, **kwargs) -> DeploymentReply:
        """One request. Keyword values that are None are left out (MII's Value carries str, int, float and
        bool only). With `image` (encoded PNG, JPEG or WebP bytes: one, or one per prompt) it is
        image-to-image, with `mask_image` too inpainting, through MII's InpaintingReply. `request_id`
        travels as metadata (the deployment's logs name it); `probe` marks the deployment's own readiness
        check, which no request count includes. `timeout`: this call's deadline in seconds (default the
        client's). `cancel`: set it to abandon the call (DeploymentError CANCELLED); the deployment stops
        working on it."""
        import grpc
        if mask_image and not image:
            raise ServingError("mask_image: a mask only together with an image")
        pb2 = proto.messages()
        values = proto.query_kwargs({k: v for k, v in kwargs.items() if v is not None})
        if image:
            fields = image_request(prompts, negatives, image, mask_image)
            method, request = "InpaintingReply", pb2.InpaintingRequest(**fields, query_kwargs=values)
        else:
            method = "Txt2ImgReply"
            request = pb2.Text2ImageRequest(prompt=list(prompts), query_kwargs=values,
                                            negative_prompt=list(negatives) if negatives else [""] * len(prompts))
        metadata = ([(wire.REQUEST_ID, request_id)] if request_id else []) + ([(wire.PROBE, "1")] if probe else [])
        seconds = self.timeout if timeout is None else float(timeout)
        if seconds <= 0:
            raise DeploymentError("DEADLINE_EXCEEDED", "the request's deadline passed before it was sent")
        call = self._stub(method).future(request, timeout=seconds, metadata=metadata)
        try:
            while True:
                try:
                    reply = call.result(timeout=CANCEL_POLL if cancel is not None else None)
                    break
                except grpc.FutureTimeoutError:
                    if cancel.is_set():
                        call.cancel()
                        raise DeploymentError("CANCELLED", "the caller cancelled the request") from None
        except grpc.FutureCancelledError:
            raise DeploymentError("CANCELLED", "the request was cancelled") from None
        except grpc.RpcError as e:
            trail = wire.trailing(e)
            raise DeploymentError(e.code().name, e.details() or e.code().name,
                                  retry_after=wire.seconds(trail.get(wire.RETRY_AFTER))) from None
        trail = wire.trailing(call)
        return DeploymentReply(proto.ImageReply(reply), wire.millis(trail.get(wire.QUEUE_MS)),
                               wire.millis(trail.get(wire.ENGINE_MS)))
