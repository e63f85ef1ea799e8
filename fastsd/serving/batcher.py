"""Dynamic batching: the callable each MII model server hosts.

MII's `ModelResponse` calls `pipeline(prompt=[...], negative_prompt=[...], **kwargs)` from a gRPC
thread pool (a `concurrent.futures.ThreadPoolExecutor`, 32 workers), but under one lock, so by
default calls reach the pipeline one at a time. The replica lifts that lock (see replica.py); then
concurrent requests reach `BatchingPipeline.__call__` concurrently, each on its own thread. Each
call validates its request, queues it and blocks on a future; one worker thread takes the oldest
request, gathers every queued request with the same key (size, steps, scheduler, guidance on/off)
until the batch size its `BatchSizer` allows for that kind of request (batch_size.py: measured, or a
forced number) or until `window` seconds after the oldest one arrived, runs them as ONE engine call
(per-image prompts, negatives, guidance and seeds), and splits the images back. A batch that may take
one image does not wait at all.

Per-image seeds make each image the one its request would get alone, up to float rounding of the
batched GEMMs (~1e-5; at most 1 level of 255 after conversion to uint8).

Deadlines: each request has one (its gRPC deadline, capped by the deployment's `--timeout`) and a
`cancelled` event (set when its call ends early: the caller went away). Its caller gets DEADLINE_EXCEEDED
(RequestTimeout) or CANCELLED (RequestCancelled) as soon as either happens, whether the request is queued or
running. A queued request that is no longer wanted is dropped before its batch runs; a running engine call
is stopped at its next denoising step once no request of its batch is still wanted (Engine.generate's
`on_step` raises GenerationStopped), so a request merged into a batch with others that are still wanted
leaves them running.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from queue import Empty, Queue

from ..errors import GenerationStopped, InvalidParameter
from ..schedulers import check_steps, make_scheduler, scheduler_name, takes_eta
from .batch_size import BatchSizer
from .engine_jobs import (Job, RequestCancelled, RequestTimeout, engine_call,  # noqa: F401 - re-exported
                          stop_unless_wanted, switch_loras)
from .histograms import BATCH_BOUNDS, hist_new, hist_observe
from .progress import Interrupted
from .request import Limits, Request, parse

log = logging.getLogger("fastsd.serving")
WAIT_POLL = 0.05  # seconds between a waiting caller's looks at its cancel event


@dataclass
class Reply:
    """What MII's `Text2ImgMethods.pack_response_to_proto` reads."""
    images: list
    nsfw_content_detected: list[bool]
    seeds: list[int] = field(default_factory=list)
    batch_requests: int = 1  # how many requests shared the engine call
    queue_seconds: float = 0.0   # from arrival to the start of its engine call
    engine_seconds: float = 0.0  # the engine call it shared


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0        # answered with images
        self.images = 0
        self.batches = 0         # engine calls
        self.merged_batches = 0  # engine calls that served more than one request
        self.merged_requests = 0  # requests that shared an engine call with others
        self.max_batch_requests = 0
        self.max_batch_images = 0
        self.bad_requests = 0
        self.timeouts = 0
        self.cancelled = 0        # callers that went away before their answer
        self.stopped_batches = 0  # engine calls stopped between steps: no request of theirs was still wanted
        self.errors = 0
        self.busy_seconds = 0.0
        self.lora_switches = 0         # LoRA sets fused (fastsd.lora), the first one included
        self.lora_switch_seconds = 0.0
        self.batch_requests_hist = hist_new(BATCH_BOUNDS)  # requests per engine call
        self.batch_images_hist = hist_new(BATCH_BOUNDS)    # images per engine call

    def as_dict(self) -> dict:
        with self.lock:
            return {k: (copy.deepcopy(v) if isinstance(v, dict) else v) for k, v in vars(self).items() if k != "lock"}


class BatchingPipeline:
    def __init__(self, engine, limits: Limits | None = None, max_batch: int = 8, window: float = 0.02,
                 on_batch=None, sizer: BatchSizer | None = None,
                 loras=None, default_loras=(), progress=None):
        self.engine = engine
        self.limits = limits or Limits()
        self.sizer = sizer or BatchSizer.fixed(max_batch)
        self.window = max(0.0, float(window))
        self.stats = Stats()
        self.on_batch = on_batch  # called after each engine call (the replica writes its stats file)
        self.progress = progress  # progress.ReplicaProgress: each step of an engine call, and the interrupt
        # LoRA: the catalogue requests name adapters from (serving/loras.py) and the set a request that
        # names none gets. The last batch's set stays fused, so a run of requests for one set pays no switch.
        self.loras = loras
        self.default_loras = list(default_loras)
        self._queue: Queue[Job] = Queue()
        self._waiting: deque[Job] = deque()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._worker.start()

    # -- the callable MII hosts -----------------------------------------------------------------
    def __call__(self, prompt=None, negative_prompt=None, image=None, mask_image=None, **kwargs) -> Reply:
        """Text-to-image; with `image` (decoded PIL images), image-to-image; with `mask_image` too, inpainting."""
        return self.handle(prompt, negative_prompt, kwargs, image=image, mask_image=mask_image)

    def _unet_in_channels(self) -> int:
        unet = getattr(self.engine.model, "unet", None)
        return int(getattr(getattr(unet, "config", None), "in_channels", 4))

    def handle(self, prompt, negative_prompt, kwargs: dict, probe: bool = False, image=None,
               mask_image=None, deadline: float | None = None, cancelled: threading.Event | None = None) -> Reply:
        """One request as it arrived (kwargs as a dict: a raw gRPC caller may name a keyword `prompt`).
        A probe (the deployment's own readiness check) is refused like any bad request but not counted.
        `deadline`: time.monotonic() by which it must be answered (capped by the deployment's timeout);
        `cancelled`: set when its caller goes away."""
        try:
            request = parse(prompt, negative_prompt, kwargs, self.limits, self.engine.model.native_size,
                            from_f32=True, loras=self.loras, image=image, mask_image=mask_image,
                            unet_in_channels=self._unet_in_channels())
            self._check_sampler(request)
            self.sizer.admit(request)
        except ValueError:
            if not probe:
                with self.stats.lock:
                    self.stats.bad_requests += 1
            raise
        return self.submit(request, deadline, cancelled)

    def _check_sampler(self, request: Request) -> None:
        """What the request's scheduler (named, or the model's own) takes: its steps (LCM and TCD at most their
        original_inference_steps) and eta (DDIM and TCD only), refused before the request joins a batch."""
        own = getattr(self.engine, "scheduler", None)
        if own is None:
            return
        sched = make_scheduler(request.scheduler, own.config) if request.scheduler else own
        check_steps(sched, request.steps)
        if request.eta and not takes_eta(sched):
            raise InvalidParameter("eta", request.eta, f"0 with the {scheduler_name(sched)} scheduler (eta is read by "
                                   "ddim and tcd only)")

    def submit(self, request: Request, deadline: float | None = None,
               cancelled: threading.Event | None = None) -> Reply:
        now = time.monotonic()
        cap = now + self.limits.timeout
        job = Job(request, cap if deadline is None else min(deadline, cap), arrival=now)
        if cancelled is not None:
            job.cancelled = cancelled
        self._queue.put(job)
        while True:
            left = job.deadline - time.monotonic()
            try:
                return job.future.result(timeout=max(0.0, min(left, WAIT_POLL)))
            except FutureTimeout:
                pass
            except (RequestTimeout, RequestCancelled) as e:  # the worker stopped the batch before we looked
                raise self._unwanted(e) from None
            if job.wanted(time.monotonic()):
                continue
            job.cancelled.set()  # the engine stops at its next step if no request of its batch is still wanted
            job.future.cancel()  # the worker skips it if it has not started
            raise self._unwanted(job.unwanted_error()) from None

    def _unwanted(self, error: Exception) -> Exception:
        """Count a request nobody waits for any more, once, whichever side saw it first."""
        with self.stats.lock:
            if isinstance(error, RequestTimeout):
                self.stats.timeouts += 1
            else:
                self.stats.cancelled += 1
        if isinstance(error, RequestTimeout):
            return RequestTimeout(f"the request did not finish within its deadline (the deployment's timeout is "
                                  f"{self.limits.timeout:g} s)")
        return error

    def queue_depth(self) -> int:
        """Requests queued, not yet in an engine call."""
        return self._queue.qsize() + len(self._waiting)

    def close(self):
        self._stop.set()
        self._worker.join(timeout=5)

    # -- the worker ----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        while not self._waiting:
            try:
                self._waiting.append(self._queue.get(timeout=0.2))
            except Empty:
                if self._stop.is_set():
                    return None
        first = self._waiting.popleft()  # the oldest: arrival order is kept in _waiting, then _queue
        batch, n = [first], first.request.n_images
        key = first.request.key
        max_batch = self.sizer.batch_for(first.request)
        if n >= max_batch:
            return batch
        for job in list(self._waiting):  # queued while the last batch ran
            if job.request.key == key and n + job.request.n_images <= max_batch:
                self._waiting.remove(job)
                batch.append(job)
                n += job.request.n_images
        window_end = first.arrival + self.window
        while n < max_batch:
            remaining = window_end - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except Empty:
                break
            if job.request.key == key and n + job.request.n_images <= max_batch:
                batch.append(job)
                n += job.request.n_images
            else:
                self._waiting.append(job)
        return batch

    def _run(self):
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch is None:
                return
            now, live = time.monotonic(), []
            for j in batch:
                if not j.future.set_running_or_notify_cancel():
                    continue  # its caller timed out or went away
                if not j.wanted(now):  # dropped while queued: its caller has its answer already
                    j.future.set_exception(j.unwanted_error())
                    continue
                live.append(j)
            if live:
                self._execute(live)

    def _use_loras(self, wanted) -> None:
        sw = switch_loras(self.engine, self.loras, wanted, self.default_loras)
        if sw is not None and sw.changed:
            with self.stats.lock:
                self.stats.lora_switches += 1
                self.stats.lora_switch_seconds += sw.seconds

    def _execute(self, batch: list[Job]):
        reqs = [j.request for j in batch]
        first = reqs[0]
        t0, started = self.sizer.clock(), time.monotonic()  # the sizer's clock may be a test's; arrival is monotonic
        try:
            self._use_loras(first.loras)
            if self.progress is not None:
                self.progress.begin(first.steps, len(batch))

            def on_step(step: int, steps: int) -> None:
                """After each denoising step: the progress file (and A1111's interrupt), then the deadlines."""
                if self.progress is not None:
                    self.progress.step(step, steps)
                stop_unless_wanted(batch, step, steps)
            result = engine_call(self.engine, reqs, on_step)
        except GenerationStopped as e:  # every caller of the batch left or timed out: none is waiting
            log.info("engine call for %d request(s) %s: none of them is still wanted", len(batch), e)
            with self.stats.lock:
                self.stats.stopped_batches += 1
            for j in batch:
                j.future.set_exception(j.unwanted_error())
            return
        except InvalidParameter as e:  # a request's LoRA set that does not load: its callers hear why
            with self.stats.lock:
                self.stats.bad_requests += len(batch)
            for j in batch:
                j.future.set_exception(e)
            return
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it
            if isinstance(e, Interrupted):
                log.info("%s (a batch of %d request(s))", e, len(batch))
            else:
                log.exception("engine call failed for a batch of %d request(s)", len(batch))
            with self.stats.lock:
                self.stats.errors += len(batch)
            for j in batch:
                j.future.set_exception(e)
            return
        finally:
            if self.progress is not None:
                self.progress.end()
        elapsed = self.sizer.clock() - t0
        i = 0
        for j in batch:
            k = j.request.n_images
            j.future.set_result(Reply(result.images[i:i + k], list(result.nsfw_content_detected[i:i + k]),
                                      result.seeds[i:i + k], len(batch), started - j.arrival, elapsed))
            i += k
        self.sizer.record(first, i, first.steps, elapsed)
        with self.stats.lock:
            s = self.stats
            s.requests += len(batch)
            s.images += i
            s.batches += 1
            s.busy_seconds += elapsed
            if len(batch) > 1:
                s.merged_batches += 1
                s.merged_requests += len(batch)
            s.max_batch_requests = max(s.max_batch_requests, len(batch))
            hist_observe(s.batch_requests_hist, len(batch))
            hist_observe(s.batch_images_hist, i)
            s.max_batch_images = max(s.max_batch_images, i)
        if self.on_batch:
            try:
                self.on_batch()
            except Exception:  # noqa: BLE001 - stats are best effort
                log.exception("on_batch failed")
