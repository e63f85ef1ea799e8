"""A client of a running deployment, for front ends that call it from many threads (the web page,
`fastsd batch --deployment`): MII's own client, one handle per thread.

MII's `mii_query_handle` binds to the event loop current when it is made, and `query` fails inside a
running loop and across threads; so each calling thread gets its own event loop and its own handle.
gRPC errors come back as `ServingError` with the status name and the server's reason (a bad value is
INVALID_ARGUMENT naming the parameter), never as a traceback.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from .errors import DeploymentError, ServingError
from .folders import cache_path, check_name, read_json, use_cache_path


@dataclass
class DeploymentInfo:
    """What a front end needs to know about a deployment to fill its form and describe the engine."""
    name: str
    model: str
    replicas: int
    max_batch: int
    limits: dict
    token_required: bool
    engine: dict  # the first replica's engine.describe(), empty until a replica wrote it
    lora_dir: str | None = None  # `fastsd serve --lora-dir`: the folder whose adapters requests may name

    def lora_names(self) -> list[str]:
        """The adapter names a request's `lora` keyword may use (read now: files added later are offered)."""
        if not self.lora_dir:
            return []
        from ..errors import InvalidParameter
        from .loras import LoraCatalog
        try:
            return LoraCatalog(self.lora_dir).names()
        except InvalidParameter:  # the folder went away since `fastsd serve`
            return []

    def describe(self) -> str:
        e = self.engine
        if not e:
            return f"{self.model} (deployment {self.name})"
        return (f"{e.get('model', self.model)}, {e.get('dtype')}, {e.get('backend')} on {e.get('device')}, "
                f"attention {e.get('attention')} (deployment {self.name}, {self.replicas} replica(s))")


def deployment_info(name: str) -> DeploymentInfo:
    """Read from the deployment's files; raises ServingError when there is no running deployment NAME."""
    check_name(name)
    ddir = cache_path() / name
    spec = read_json(ddir / "spec.json")
    if spec is None or not (ddir / "score.py").exists():
        raise ServingError(f"no running deployment named '{name}' in {cache_path()} "
                           "(start one with `fastsd serve`; set MII_CACHE_PATH to the folder it was started with)")
    engine = {}
    for i in range(len(spec["replicas"])):
        engine = (read_json(ddir / f"replica-{i}.json") or {}).get("engine") or {}
        if engine:
            break
    return DeploymentInfo(name=name, model=spec["model"], replicas=len(spec["replicas"]), max_batch=spec["max_batch"],
                          limits=spec["limits"], token_required=bool(spec.get("token_required")), engine=engine,
                          lora_dir=spec.get("lora_dir"))


def image_request(prompts: list[str], negatives: list[str] | None, image, mask_image) -> dict:
    """The query dict MII's client sends through the InpaintingReply RPC (a `NAME-inpaint` handle): encoded
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
    """Thread-safe: `generate` may be called from any number of threads at once."""

    def __init__(self, name: str, timeout: float | None = None):
        use_cache_path()
        self.info = deployment_info(name)
        from .deploy import import_mii
        import_mii()  # seconds of imports (deepspeed), paid here rather than by the first request
        self.name = name
        self.timeout = float(timeout if timeout is not None else self.info.limits.get("timeout", 300.0)) + 5.0
        self._local = threading.local()

    def _handle(self, images: bool = False):
        """MII's handle for NAME (text-to-image), or for its record NAME-inpaint (images: MII's InpaintingReply)."""
        attr = "inpaint_handle" if images else "handle"
        if getattr(self._local, attr, None) is None:
            from .deploy import INPAINT_SUFFIX, import_mii
            mii = import_mii()
            if getattr(self._local, "loop", None) is None:
                self._local.loop = asyncio.new_event_loop()
                asyncio.set_event_loop(self._local.loop)
            setattr(self._local, attr, mii.legacy.mii_query_handle(self.name + (INPAINT_SUFFIX if images else "")))
        return getattr(self._local, attr)

    def generate(self, prompts: list[str], negatives: list[str] | None = None, *, image: list[bytes] | None = None,
                 mask_image: list[bytes] | None = None, **kwargs):
        """One request; returns MII's reply (`.images`, `.nsfw_content_detected`). Keyword values that are
        None are left out (MII's Value carries str, int, float and bool only). With `image` (encoded PNG,
        JPEG or WebP bytes: one, or one per prompt) it is image-to-image, with `mask_image` too inpainting,
        through MII's InpaintingReply as the README's MII example sends it."""
        import grpc
        if mask_image and not image:
            raise ServingError("mask_image: a mask only together with an image")
        handle = self._handle(images=bool(image))
        request = (image_request(prompts, negatives, image, mask_image) if image else
                   {"prompt": list(prompts), "negative_prompt": list(negatives) if negatives else [""] * len(prompts)})
        kw = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return self._local.loop.run_until_complete(
                asyncio.wait_for(handle._request_async_response(request, **kw), self.timeout))
        except grpc.aio.AioRpcError as e:
            raise DeploymentError(e.code().name, e.details() or e.code().name) from None
        except asyncio.TimeoutError:
            raise DeploymentError("DEADLINE_EXCEEDED", f"no reply within {self.timeout:g} s") from None
