"""One engine replica of the Ray Serve application: a fastsd engine, loaded once when the replica starts.

`generate(call)` takes what the shared HTTP layer checked (request.parse_query's fields: prompts,
negatives, parameters, encoded images) and the seconds left of its deadline, runs the replica-side
checks (request.parse, the same as a gRPC replica's) and answers a dict: {"images", "nsfw", "queue_ms",
"engine_ms"}, or {"error": <gRPC status name>, "message"} for a refused or failed request (a plain
message; the traceback goes to this replica's log), so errors cross Ray as data, not pickled exceptions.

- Dynamic batching: `@serve.batch` gathers concurrent calls (up to max_batch images, batch_size_fn counts
  images) for batch_wait_ms; requests with equal keys (size, steps, scheduler, guidance on/off, LoRA set:
  Request.key) share ONE engine call with per-image prompts, seeds and guidance (batcher.engine_call), so
  each image is the one the request gets alone.
- Per-request LoRA: the `lora` value is the multiplexed model id (the ingress sets it); `@serve.multiplexed`
  keeps up to MAX_ADAPTER_SETS checked adapter sets per replica, Serve routes a request to a replica that
  holds its set when it can, and splits batches by model id. The set is fused into the weights for its
  engine call (Engine.set_loras, exact switches).
- Deadlines: each call carries the seconds left; a request past its deadline, or whose caller cancelled it
  (the ingress cancels the DeploymentResponse when its client goes away or its deadline passes), is
  dropped before its batch runs, and a running engine call stops at its next denoising step once no
  request of its batch is still wanted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from ray import serve

from ...errors import GenerationStopped, InvalidParameter
from ...lora import LoraError, read_lora
from ..engine_jobs import Job, RequestCancelled, engine_call, stop_unless_wanted, switch_loras
from ..loras import LoraCatalog
from ..replica import build_engine, decode_images
from ..request import Request, parse
from ..spec import DeploymentSpec

log = logging.getLogger("fastsd.serving.ray")
MAX_ADAPTER_SETS = 3  # LoRA sets (multiplexed model ids) a replica keeps checked and ready


def _unwanted(job: Job) -> dict:
    """A dropped or stopped request's answer, as data (errors do not cross Ray as pickled exceptions)."""
    error = job.unwanted_error()
    return {"error": "CANCELLED" if isinstance(error, RequestCancelled) else "DEADLINE_EXCEEDED",
            "message": str(error)}


def _images(jobs: list[Job]) -> int:
    return sum(j.request.n_images for j in jobs)


class EngineReplica:
    def __init__(self, spec: DeploymentSpec, max_batch: int, batch_wait_s: float):
        import torch  # the engine's; an ingress never imports it
        if spec.threads:
            torch.set_num_threads(spec.threads)
        t0 = time.monotonic()
        self.spec = spec
        self.engine = build_engine(spec)
        self.catalog = LoraCatalog(spec.lora_dir) if spec.lora_dir else None
        self.lock = threading.Lock()  # one engine call at a time
        self.calls = 0
        self.merged = 0  # engine calls that served more than one request
        self.stopped = 0  # engine calls stopped between steps: no request of theirs was still wanted
        self._batched.set_max_batch_size(max_batch)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        log.info("engine replica for %s loaded in %.1f s (max batch %d, wait %g s)", spec.model,
                 time.monotonic() - t0, max_batch, batch_wait_s)

    def whoami(self) -> dict:
        """Where this replica runs (tests and operators): Ray node id, process id, engine calls so far."""
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "actor_id": ctx.get_actor_id(),
                "engine_calls": self.calls, "merged_calls": self.merged, "stopped_calls": self.stopped}

    def check_health(self) -> None:
        """Serve's periodic health check: the engine is loaded."""
        if self.engine is None:
            raise RuntimeError("no engine")

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTER_SETS)
    async def adapter_set(self, model_id: str) -> tuple:
        """A request's `lora` value -> its checked ((name, scale), ...): every file read once as a LoRA of
        this model, so a broken one is refused (422 naming it) before the request joins a batch."""
        if self.catalog is None:
            raise InvalidParameter("lora", model_id, "none: this deployment has no lora_dir")
        parsed = self.catalog.parse(model_id)

        def read():
            for name, _ in parsed:
                try:
                    read_lora(self.catalog.path(name), unet_config=self.engine.model.unet.config)
                except LoraError as e:
                    raise self.catalog.broken(e, parsed) from None
        await asyncio.to_thread(read)
        return parsed

    def _parse(self, call: dict) -> Request:
        limits = self.spec.limits
        image, mask = decode_images(limits, call.get("image") or [], call.get("mask_image") or [])
        unet = getattr(self.engine.model, "unet", None)
        channels = int(getattr(getattr(unet, "config", None), "in_channels", 4))
        # from_f32: the same rounding as a value that crossed MII's gRPC, so both runtimes give the same images
        return parse(call["prompt"], call.get("negative_prompt"), dict(call.get("parameters") or {}), limits,
                     self.engine.model.native_size, from_f32=True, loras=self.catalog, image=image or None,
                     mask_image=mask or None, unet_in_channels=channels)

    async def generate(self, call: dict) -> dict:
        rid = call.get("request_id") or "-"
        job = None
        try:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.adapter_set(model_id)
            request = await asyncio.to_thread(self._parse, call)
            if request.loras and model_id and request.loras != self.catalog.parse(model_id):
                raise InvalidParameter("lora", model_id, "the same set as the request's multiplexed model id")
            job = Job(request, time.monotonic() + max(0.0, float(call.get("seconds", self.spec.limits.timeout))))
            return await self._batched(job)
        except asyncio.CancelledError:
            if job is not None:
                job.cancelled.set()  # the engine stops at its next step if no request of its batch is wanted
            raise
        except InvalidParameter as e:
            return {"error": "INVALID_ARGUMENT", "message": str(e)}
        except Exception:  # noqa: BLE001 - the log gets the traceback, the caller a plain reason
            log.exception("request %s failed", rid)
            return {"error": "INTERNAL", "message": f"the replica failed to answer this request (request id {rid})"}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02, batch_size_fn=_images)
    async def _batched(self, jobs: list[Job]) -> list[dict]:
        """A batch Serve gathered (one multiplexed model id): one engine call per batch key, in a thread."""
        out: dict[int, dict] = {}
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.request.key, []).append(i)
        for idx in groups.values():
            group = [jobs[i] for i in idx]
            for i, answer in zip(idx, await asyncio.to_thread(self._run, group)):
                out[i] = answer
        return [out[i] for i in range(len(jobs))]

    def _run(self, jobs: list[Job]) -> list[dict]:
        live = [j for j in jobs if j.wanted()]
        answers = {id(j): _unwanted(j) for j in jobs if j not in live}
        if live:
            answers.update(zip(map(id, live), self._engine_call(live)))
        return [answers[id(j)] for j in jobs]

    def _engine_call(self, jobs: list[Job]) -> list[dict]:
        reqs = [j.request for j in jobs]
        started = time.monotonic()

        def on_step(step: int, steps: int) -> None:
            stop_unless_wanted(jobs, step, steps)
        with self.lock:
            try:
                switch_loras(self.engine, self.catalog, reqs[0].loras or None)
                result = engine_call(self.engine, reqs, on_step)
            except GenerationStopped as e:
                log.info("engine call for %d request(s) %s: none of them is still wanted", len(jobs), e)
                self.stopped += 1
                return [_unwanted(j) for j in jobs]
            except InvalidParameter as e:
                return [{"error": "INVALID_ARGUMENT", "message": str(e)}] * len(jobs)
            finally:
                self.calls += 1
                self.merged += len(jobs) > 1
        engine_ms = (time.monotonic() - started) * 1000
        answers, i = [], 0
        for j in jobs:
            k = j.request.n_images
            answers.append({"images": result.images[i:i + k], "nsfw": list(result.nsfw_content_detected[i:i + k]),
                            "queue_ms": (started - j.arrival) * 1000, "engine_ms": engine_ms})
            i += k
        return answers
