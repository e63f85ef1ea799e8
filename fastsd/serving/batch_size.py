"""How many images one engine call takes: measured, per model, device and kind of request.

Batching pays where a bigger batch raises images per second (a GPU; a small model on the CPU) and costs
where it does not (a real-size model on the CPU: same throughput, every request waits for the slowest,
more memory). `BatchSizer` decides it from measurements, for each `Bucket` (task, size, steps bucket,
guidance on/off) a replica serves:

- the ladder 1, 2, 4, ... up to `limit` images per call is climbed while each rung raises throughput
  (image-steps per second, so requests of different steps in one bucket compare) by at least
  `min_gain` (10%) over the rung below; the choice is the last rung that paid;
- a rung is measured `samples` times (once when a call takes `cheap_seconds` or longer: there the
  first-call overhead is small against the call) and its best rate counts, the usual benchmark rule
  (noise only ever slows a call down);
- the replica measures the native size at start-up with synthetic calls (`measure`, a short warm-up
  that `fastsd serve` waits for); any other bucket is measured online, on real requests: while a
  bucket is undecided, a batch may gather only the rung being measured (`batch_for`), and every
  engine call reports its time (`record`); a decided bucket is decided again when a smaller batch later
  runs within `min_gain` of the chosen one (the measurement that chose it was disturbed);
- memory caps the batch: `need(images, height, width, guided)` estimates a replica's peak (the engine's
  memory plan, kernels/memory.py, plus what the replica already holds) and `budget_bytes` is its share
  of the host; a request whose images cannot fit even alone is refused (`admit`).

A number instead of "auto" forces the batch size (still within the memory cap).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidParameter

log = logging.getLogger("fastsd.serving")

STEP_EDGES = (4, 16, 64, 256, 1000)  # steps buckets 1-4, 5-16, 17-64, 65-256, 257-1000
DEFAULT_TASK = "text2img"  # fastsd.tasks names: text2img | img2img | inpaint


def steps_bucket(steps: int) -> str:
    lo = 1
    for hi in STEP_EDGES:
        if steps <= hi:
            return f"{lo}-{hi}"
        lo = hi + 1
    return f"{lo}+"


@dataclass(frozen=True)
class Bucket:
    """Requests whose best batch size is the same: a batch's cost depends on these, not on prompts or
    seeds. Steps are bucketed (the per-call overhead shrinks against the steps)."""
    task: str
    height: int
    width: int
    steps: str
    guided: bool

    def __str__(self) -> str:
        return f"{self.task} {self.width}x{self.height} {self.steps} steps" + (" guided" if self.guided else "")


def bucket_of(request) -> Bucket:
    """The bucket of a serving request (request.Request); a request type with a `task` brings its own."""
    return Bucket(getattr(request, "task", DEFAULT_TASK), request.height, request.width,
                  steps_bucket(request.steps), max(request.guidance) > 1.0)


@dataclass
class Curve:
    """Measurements of one bucket: image-steps/s and call seconds per batch size, and the choice."""
    rates: dict[int, list[float]] = field(default_factory=dict)
    seconds: dict[int, list[float]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # steps of the last call per batch size
    chosen: int | None = None
    reason: str = ""
    source: str = "online"  # "start-up" when measured by `measure`

    def best(self, b: int) -> float:
        return max(self.rates[b])


class BatchSizer:
    def __init__(self, mode: int | str = "auto", limit: int = 8, min_gain: float = 0.10, samples: int = 3,
                 cheap_seconds: float = 2.0, need: Callable[[int, int, int, bool], int] | None = None,
                 budget_bytes: int | None = None, budget_source: str = "", clock=time.perf_counter):
        if mode != "auto" and not (isinstance(mode, int) and mode >= 1):
            raise ValueError(f"batch size mode: 'auto' or a positive integer, got {mode!r}")
        self.mode = mode
        self.limit = int(mode) if mode != "auto" else max(1, int(limit))
        self.min_gain = float(min_gain)
        self.samples = max(1, int(samples))
        self.cheap_seconds = float(cheap_seconds)
        self.need = need
        self.budget_bytes = budget_bytes
        self.budget_source = budget_source
        self.clock = clock
        self.curves: dict[Bucket, Curve] = {}
        self._caps: dict[tuple, tuple[int, int]] = {}  # (height, width, guided) -> (cap, checked up to)
        self._lock = threading.Lock()

    @classmethod
    def fixed(cls, n: int) -> "BatchSizer":
        return cls(mode=max(1, int(n)))

    @property
    def ladder(self) -> list[int]:
        out, b = [], 1
        while b < self.limit:
            out.append(b)
            b *= 2
        return out + [self.limit]

    # -- memory ----------------------------------------------------------------------------------
    def memory_cap(self, height: int, width: int, guided: bool, upto: int) -> int:
        """Most images of this size one call may take within the memory budget (0: not even one)."""
        if self.need is None or self.budget_bytes is None:
            return upto
        key = (height, width, guided)
        cap, checked = self._caps.get(key, (0, 0))
        if cap < checked or checked >= upto:  # exact, or known to reach `upto`
            return min(cap, upto)
        for b in range(checked + 1, upto + 1):  # the estimate is cheap arithmetic (kernels.plan_memory)
            if self.need(b, height, width, guided) > self.budget_bytes:
                break
            cap = b
        self._caps[key] = (cap, upto)
        return cap

    def admit(self, request) -> None:
        """Refuses a request that cannot fit this replica's memory even alone."""
        g = max(request.guidance) > 1.0
        n = request.n_images
        cap = self.memory_cap(request.height, request.width, g, n)
        if cap >= n:
            return
        share = f"this replica's memory share is {_gib(self.budget_bytes)} ({self.budget_source})"
        if cap == 0:
            raise InvalidParameter("height x width", f"{request.height}x{request.width}",
                                   f"a size whose one image fits: it needs ~{_gib(self.need(1, request.height, request.width, g))}, "
                                   + share)
        raise InvalidParameter("num_images_per_prompt", n,
                               f"at most {cap} images per request at {request.width}x{request.height}; " + share)

    # -- the choice ------------------------------------------------------------------------------
    def _enough(self, curve: Curve, b: int) -> bool:
        secs = curve.seconds.get(b, [])
        return bool(secs) and (len(secs) >= self.samples or secs[0] >= self.cheap_seconds)

    def _decide(self, bucket: Bucket, curve: Curve) -> int:
        """The decided batch size, or the rung to measure next (curve.chosen stays None)."""
        if curve.chosen is not None:
            return curve.chosen
        cap = self.memory_cap(bucket.height, bucket.width, bucket.guided, self.limit)
        ladder = self.ladder
        if not self._enough(curve, ladder[0]):
            return ladder[0]
        for prev, b in zip(ladder, ladder[1:]):
            if b > cap:
                return self._choose(bucket, curve, prev, f"{b} images do not fit the memory share "
                                                         f"({_gib(self.budget_bytes)})")
            if not self._enough(curve, b):
                return b
            gain = curve.best(b) / curve.best(prev) - 1
            if gain < self.min_gain:
                return self._choose(bucket, curve, prev, f"{b} images per call gain {gain:+.0%} over {prev}, "
                                                         f"less than {self.min_gain:.0%}")
        return self._choose(bucket, curve, ladder[-1], f"every step up to --max-batch-limit {self.limit} "
                                                       f"gained {self.min_gain:.0%} or more")

    def _choose(self, bucket: Bucket, curve: Curve, b: int, reason: str) -> int:
        curve.chosen, curve.reason = b, reason
        rates = ", ".join(f"{k}: {self._images_per_s(curve, k):.3g}" for k in sorted(curve.rates))
        log.info("batch size for %s: %d image(s) per call (%s); measured images/s by batch size: %s",
                 bucket, b, reason, rates)
        return b

    def batch_for(self, request) -> int:
        """Most images the batch that starts with `request` may gather."""
        bucket = bucket_of(request)
        g = bucket.guided
        if self.mode != "auto":
            cap = self.memory_cap(request.height, request.width, g, self.limit)
            return max(1, min(self.limit, cap))
        with self._lock:
            curve = self.curves.setdefault(bucket, Curve())
            return self._decide(bucket, curve)

    def record(self, request, images: int, steps: int, seconds: float) -> None:
        """One engine call of `images` images of the bucket of `request`, `steps` steps, took `seconds`."""
        if seconds <= 0:
            return
        bucket = bucket_of(request)
        with self._lock:
            curve = self.curves.setdefault(bucket, Curve())
            curve.rates.setdefault(images, []).append(images * steps / seconds)
            curve.seconds.setdefault(images, []).append(seconds)
            curve.steps[images] = steps
            for k in (curve.rates, curve.seconds):
                del k[images][:-8]  # keep the recent few
            if self.mode == "auto" and curve.chosen is not None and images < curve.chosen and \
                    curve.chosen in curve.rates and curve.best(curve.chosen) < curve.best(images) * (1 + self.min_gain):
                # a smaller batch just ran at least about as fast: the measurement that chose the larger one
                # was disturbed (one sample per rung where calls are long), so climb the ladder again
                log.info("batch size for %s: %d image(s) per call ran at %.3g images/s against %.3g for the "
                         "chosen %d; deciding again", bucket, images, self._images_per_s(curve, images),
                         self._images_per_s(curve, curve.chosen), curve.chosen)
                curve.chosen, curve.reason = None, ""
            if self.mode == "auto" and curve.chosen is None:
                self._decide(bucket, curve)

    def measure(self, run: Callable[[int], float], request, steps: int, max_calls: int = 32) -> Curve:
        """Measures a bucket now, with synthetic calls: `run(n)` runs n images of the bucket of
        `request` at `steps` steps and returns the seconds it took. A first call (not counted) pays
        for what any first call at a new shape pays."""
        bucket = bucket_of(request)
        if self.mode != "auto":
            return self.curves.setdefault(bucket, Curve())
        run(1)
        for _ in range(max_calls):
            with self._lock:
                curve = self.curves.setdefault(bucket, Curve(source="start-up"))
                b = self._decide(bucket, curve)
                if curve.chosen is not None:
                    return curve
            self.record(request, b, steps, run(b))
        with self._lock:
            return self.curves[bucket]

    @staticmethod
    def _images_per_s(curve: Curve, b: int) -> float:
        return curve.best(b) / max(1, curve.steps.get(b, 1))

    def describe(self) -> dict:
        """For replica-N.json, `fastsd status` and the log."""
        with self._lock:
            buckets = []
            for bucket, c in self.curves.items():
                buckets.append({"bucket": str(bucket), "chosen": c.chosen,
                                "state": "decided" if c.chosen is not None else "measuring",
                                "reason": c.reason, "source": c.source,
                                "images_per_s": {str(b): round(self._images_per_s(c, b), 4) for b in sorted(c.rates)},
                                "steps": {str(b): s for b, s in sorted(c.steps.items())}})
        return {"mode": self.mode, "limit": self.limit, "min_gain": self.min_gain,
                "memory_budget_bytes": self.budget_bytes, "memory_budget_source": self.budget_source,
                "buckets": buckets}


def _gib(n) -> str:
    return f"{(n or 0) / 2**30:.1f} GiB"


# -- the real engine: memory estimate and synthetic calls ------------------------------------------
def engine_need(engine, base_bytes: int) -> Callable[[int, int, int, bool], int] | None:
    """Peak bytes of `images` images per call: what the replica already holds (`base_bytes`: resident
    memory with the model loaded, or 0 on a GPU where the budget is measured after loading) plus the
    engine's memory plan for the call (kernels.plan_memory: attention scores, activations, VAE decode,
    with the slicing and tiling the plan would choose)."""
    import torch

    from ..kernels import plan_memory  # torch: sizing the batches of a fake engine (tests) does without it
    model, backend = engine.model, engine.backend
    if getattr(model.unet, "config", None) is None or getattr(model.vae, "config", None) is None:
        return None  # no architecture to plan with: no memory cap
    dtype = getattr(backend, "dtype", torch.float32)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    device = getattr(backend, "device", "cpu")
    flash = getattr(backend, "attention", None) in ("triton", "xformers") or (
        getattr(backend, "attention", None) == "sdpa" and str(device).startswith("cuda"))

    def need(images: int, height: int, width: int, guided: bool) -> int:
        plan = plan_memory(model.unet.config, model.vae.config, images, height, width, dtype, device,
                           budget_bytes=1 << 62, cfg_batch_factor=2 if guided else 1, flash_backend=flash)
        return int(base_bytes + plan.estimated_peak_bytes)
    return need


PROBE_TASKS = {"depth": "depth", "upscale": "upscale"}  # model kinds whose calls need an image: their own task


def probe_task(model) -> str:
    """The task of the start-up probe calls: a depth or x4 upscaler model's own, else text-to-image."""
    return PROBE_TASKS.get(getattr(model, "kind", None), DEFAULT_TASK)


def probe_size(model) -> int:
    """The side of the start-up probe's images: the model's native size; for the x4 upscaler at least 64, the
    smallest output its input limits allow (a tiny folder's native size can be below it)."""
    size = int(model.native_size)
    return max(size, 64) if probe_task(model) == "upscale" else size


def probe_inputs(model, height: int, width: int) -> dict:
    """What a probe call adds for a model that takes an image: a depth model a (height x width) gradient at its
    default strength, its own estimator making the map as for a request without one; the x4 upscaler a
    gradient a quarter of the output's size (the output is 4x, so no height/width)."""
    task = probe_task(model)
    if task == DEFAULT_TASK:
        return {"height": height, "width": width}
    from PIL import Image
    scale = 4 if task == "upscale" else 1
    image = Image.linear_gradient("L").resize((width // scale, height // scale)).convert("RGB")
    return {"image": image} if task == "upscale" else {"image": image, "height": height, "width": width}


def engine_run(engine, height: int, width: int, steps: int, guidance: float, clock=time.perf_counter):
    """`run(n)` for `BatchSizer.measure`: one engine call of n images with distinct prompts and seeds (and, for a
    depth or upscaler model, one input image: probe_inputs)."""
    calls = iter(range(1 << 30))
    inputs = probe_inputs(engine.model, height, width)

    def run(n: int) -> float:
        i = next(calls)
        t = clock()
        engine.generate([f"batch size probe {i}.{k}" for k in range(n)], [""] * n, num_inference_steps=steps,
                        guidance_scale=guidance, seed=[i * 64 + k for k in range(n)], progress=False, **inputs)
        return clock() - t
    return run


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_free_memory() -> None:
    """Gives the heap pages freed after the start-up measurement back to the OS: glibc keeps them
    otherwise, and a replica would look (and count, for the host) as big as its largest probe batch."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
