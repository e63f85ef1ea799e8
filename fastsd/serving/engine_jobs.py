"""A request's claim on an engine call, shared by both runtimes' replicas (MII's BatchingPipeline and Ray's
EngineReplica): its deadline and its caller's cancel event, ONE engine call for a batch of requests, the
check that stops a running call once none of its requests is wanted, and the switch to the batch's LoRA set.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import FastSDError, GenerationStopped
from ..lora import LoraError
from .request import Request


class RequestTimeout(FastSDError, TimeoutError):
    """A request that did not finish within its deadline (the deployment's per-request timeout at most)."""


class RequestCancelled(FastSDError):
    """A request whose caller went away before it was answered."""


@dataclass(eq=False)  # a job is itself: callers find theirs by identity, never by equal fields
class Job:
    request: Request
    deadline: float  # time.monotonic()
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)  # MII's batcher answers through it; Ray through serve.batch

    def wanted(self, now: float | None = None) -> bool:
        return not self.cancelled.is_set() and (time.monotonic() if now is None else now) < self.deadline

    def unwanted_error(self) -> RequestCancelled | RequestTimeout:
        """Cancelled before its deadline is the caller's doing; otherwise the deadline passed."""
        if self.cancelled.is_set() and time.monotonic() < self.deadline:
            return RequestCancelled("the caller went away before the request was answered")
        return RequestTimeout("the request's deadline passed before it was answered")


def stop_unless_wanted(jobs: list[Job], step: int, steps: int) -> None:
    """Engine.generate's on_step: stop a call between steps once no request of its batch is still wanted."""
    if step < steps and not any(j.wanted() for j in jobs):
        raise GenerationStopped(f"stopped after step {step} of {steps}")


def switch_loras(engine, catalog, wanted, default_refs=()):
    """Fuse a batch's LoRA set (every request of a batch has the same one: it is in the batch key); `wanted`
    None means the deployment's default set. Returns Engine.set_loras's switch, or None when no LoRA was ever
    fused and none is wanted. A file that reads but does not load is marked invalid in the catalogue and
    raised as the request's InvalidParameter, naming the adapter, not its path."""
    refs = list(default_refs) if wanted is None else catalog.refs(wanted)
    if getattr(engine, "loras", None) is None and not refs:
        return None
    try:
        return engine.set_loras(refs)
    except LoraError as e:
        if wanted is None:
            raise
        raise catalog.broken(e, wanted) from None


def engine_call(engine, reqs: list[Request], on_step=None):
    """ONE engine call for requests of one batch key (size, steps, scheduler, task, LoRA set: batch_size.py):
    per-image prompts, negatives, guidance and seeds; the images come back in the requests' order."""
    first = reqs[0]
    guidance = [g for r in reqs for g in r.guidance]
    images = {}
    if first.task != "text2img":  # one image (and mask) per generated image; task and strength are in the key
        images = {"image": [im for r in reqs for im in r.images], "strength": first.strength}
        if first.task == "inpaint":
            images["mask_image"] = [m for r in reqs for m in r.masks]
        if first.depth_maps is not None:  # depth maps sent or not is in the key: all of the batch or none
            images["depth_map"] = [m for r in reqs for m in r.depth_maps]
        if first.task == "upscale":  # the output is 4x the image: no height/width; noise_level is in the key
            images = {"image": images["image"], "noise_level": first.noise_level}
    size = {} if first.task == "upscale" else {"height": first.height, "width": first.width}
    return engine.generate(
        [p for r in reqs for p in r.prompts], [n for r in reqs for n in r.negatives],
        num_images_per_prompt=1, num_inference_steps=first.steps,
        guidance_scale=guidance[0] if len(set(guidance)) == 1 else guidance,
        **size, seed=[s for r in reqs for s in r.seeds],
        scheduler=first.scheduler, progress=False, eta=first.eta, on_step=on_step, **images)

