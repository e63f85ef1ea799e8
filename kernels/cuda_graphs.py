"""CUDA graphs for the UNet call, one graph per input shape, in a bounded LRU cache.

A CUDA graph replays a fixed sequence of kernels on fixed memory: inputs must be copied into the
static tensors the graph was captured with, and a different batch size or resolution needs its own
graph. `CUDAGraphRunner` keys graphs by (batch, height, width, dtype) (plus the text length and
embedding width of encoder_hidden_states, which also fix shapes), captures a new graph on a miss
instead of failing, and evicts the least recently used graph beyond `max_graphs`.

Capture follows torch.cuda.CUDAGraph's documented recipe: allocate static inputs, warm up on a side
stream (so lazy initialisation, cuDNN autotuning and allocator growth happen outside the capture),
capture under `torch.cuda.graph`, then per call `copy_` the new inputs into the static ones and
`replay()`. Each graph has its own private memory pool, freed when the graph is evicted.

The output tensor of a replay is overwritten by the next replay of the same graph, so by default the
runner returns a clone (`clone_output=True`); pass False to get the static output when the caller
consumes it before the next call.

Capture and replay run with the inputs' device made current (`on_device`), and each capture gets a side
stream and a capture stream made on that device and passed to `torch.cuda.graph(stream=...)`. Without the
explicit stream, torch.cuda.graph uses one class-wide default capture stream, created on whichever device
captured first: a later capture for another GPU recorded on GPU 0's stream, and its graph came out empty.
The static inputs are allocated on the inputs' device.

When a capture runs out of memory, the failed capture is let go first (the exception, its traceback and the
half-built graph it references), then the cached graphs are dropped (their pools freed), and the capture
is tried once more; if that fails too, that shape runs eagerly from then on.

One runner serves one call at a time (a lock around copy-in, replay and copy-out): its static buffers are
shared by every caller, so two threads calling an accelerated pipeline would otherwise overwrite each
other's inputs between copy and replay.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .device_guard import on_device

logger = logging.getLogger("fastsd.kernels")

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def available(device=None) -> tuple[bool, str]:
    """(True, reason) when CUDA graphs can be captured on `device` (default: the current CUDA device)."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"CUDA graphs need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return False, (f"CUDA graphs need a CUDA device; torch.cuda.is_available() is False "
                       f"(torch {torch.__version__}, {build})")
    if not hasattr(torch.cuda, "CUDAGraph"):
        return False, f"torch {torch.__version__} has no torch.cuda.CUDAGraph"
    return True, f"CUDA graphs on {torch.cuda.get_device_name(device)}"


@dataclass
class CapturedGraph:
    """What a capture function returns: the static inputs to copy into, a replay callable, and the
    static output that replay() refreshes."""
    static_inputs: tuple[torch.Tensor, ...]
    replay: Callable[[], None]
    static_output: torch.Tensor
    graph: Any = None  # the torch.cuda.CUDAGraph, kept alive with its memory pool


def capture_cuda_graph(fn: UNetFn, example_inputs: tuple[torch.Tensor, ...], warmup: int = 3) -> CapturedGraph:
    """Capture `fn(*static_inputs)` in a torch.cuda.CUDAGraph (the documented recipe), on the inputs' device,
    with a capture stream of that device (never torch.cuda.graph's process-wide default stream)."""
    device = example_inputs[0].device
    with on_device(device):  # the side stream, the capture stream and the graph all belong to `device`
        static_inputs = tuple(t.to(device=device, copy=True) for t in example_inputs)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(*static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture_stream = torch.cuda.Stream(device=device)
        with torch.no_grad(), torch.cuda.graph(graph, stream=capture_stream):
            static_output = fn(*static_inputs)

    def replay():
        with on_device(device):  # replay launches on the current device's stream
            graph.replay()

    return CapturedGraph(static_inputs, replay, static_output, graph)


def unet_callable(unet) -> UNetFn:
    """Adapt a diffusers UNet2DConditionModel to fn(sample, timestep, encoder_hidden_states) -> noise."""
    def fn(sample, timestep, encoder_hidden_states):
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    return fn


class CUDAGraphRunner:
    """Run `unet_fn(sample, timestep, encoder_hidden_states) -> noise` through cached CUDA graphs.

    unet_fn: the UNet call (a diffusers UNet module is adapted with `unet_callable`).
    max_graphs: LRU bound on cached graphs (each holds its own activation memory).
    capture_fn: `(fn, example_inputs) -> CapturedGraph`; defaults to `capture_cuda_graph`. Tests inject
        a CPU stand-in to exercise the cache logic.
    """

    def __init__(self, unet_fn, *, max_graphs: int = 4, capture_fn: Optional[Callable] = None,
                 clone_output: bool = True, device=None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if isinstance(unet_fn, torch.nn.Module):
            unet_fn = unet_callable(unet_fn)
        if capture_fn is None:
            ok, reason = available(device)
            if not ok:
                raise RuntimeError(f"CUDAGraphRunner unavailable: {reason}")
            capture_fn = capture_cuda_graph
        self.fn = unet_fn
        self.max_graphs = max_graphs
        self.capture_fn = capture_fn
        self.clone_output = clone_output
        self._graphs: OrderedDict[tuple, CapturedGraph] = OrderedDict()
        self.captures = 0
        self.evictions = 0
        self.replays = 0
        self.eager_calls = 0
        self._eager_keys: set[tuple] = set()  # shapes whose capture ran out of memory twice
        self._lock = threading.Lock()  # one call at a time: the static buffers are shared

    @staticmethod
    def key(sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple:
        b, _, h, w = sample.shape
        return (b, h, w, sample.dtype, tuple(encoder_hidden_states.shape[1:]), encoder_hidden_states.dtype)

    def cached_keys(self) -> list[tuple]:
        return list(self._graphs)

    def _timestep(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        # A graph has one static timestep tensor: normalise to float32 of shape (batch,) on the device.
        t = torch.as_tensor(timestep, device=sample.device)
        return t.to(torch.float32).reshape(-1).expand(sample.shape[0]).contiguous()

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._call(sample, timestep, encoder_hidden_states)

    def _call(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        t = self._timestep(timestep, sample)
        key = self.key(sample, encoder_hidden_states)
        if key in self._eager_keys:
            self.eager_calls += 1
            with torch.no_grad():
                return self.fn(sample, t, encoder_hidden_states)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                old_key, old = self._graphs.popitem(last=False)
                self.evictions += 1
                logger.info("CUDA graph cache full (%d): evicted %s", self.max_graphs, old_key)
                del old
            logger.info("capturing a CUDA graph for %s", key)
            entry = self._capture(key, (sample, t, encoder_hidden_states))
            if entry is None:
                self.eager_calls += 1
                with torch.no_grad():
                    return self.fn(sample, t, encoder_hidden_states)
            self._graphs[key] = entry
            self.captures += 1
        else:
            self._graphs.move_to_end(key)
        for static, new in zip(entry.static_inputs, (sample, t, encoder_hidden_states)):
            static.copy_(new)
        entry.replay()
        self.replays += 1
        out = entry.static_output
        return out.clone() if self.clone_output else out

    def _capture(self, key: tuple, inputs: tuple) -> Optional[CapturedGraph]:
        """Capture a graph; on running out of memory, let the failed capture go, drop every cached graph
        (freeing their pools) and try once more; None (run eagerly from now on) when that fails too.

        The retry runs after the `except` block, not in it: inside it the exception's traceback still holds
        the failed capture's frame (its half-built graph, static inputs and streams), whose memory the retry
        needs."""
        captured, failure = self._try_capture(inputs)
        if failure is None:
            return captured
        dropped = len(self._graphs)
        self._graphs.clear()
        self.evictions += dropped
        self._release()
        logger.warning("CUDA graph capture for %s ran out of memory (%s); dropped %d cached graph(s), retrying",
                       key, failure, dropped)
        captured, failure = self._try_capture(inputs)
        if failure is None:
            return captured
        self._release()
        self._eager_keys.add(key)
        logger.warning("CUDA graph capture for %s ran out of memory again: that shape runs without a "
                       "graph from now on", key)
        return None

    def _try_capture(self, inputs: tuple) -> tuple[Optional[CapturedGraph], Optional[str]]:
        """(graph, None) when the capture worked, else (None, the first line of the out-of-memory error):
        the exception itself, and the traceback that holds the failed capture, are not kept."""
        try:
            return self.capture_fn(self.fn, inputs), None
        except torch.cuda.OutOfMemoryError as exc:
            return None, (str(exc).splitlines()[0][:120] if str(exc) else "OOM")

    @staticmethod
    def _release() -> None:
        """Free what a failed capture left: collect its cycles, then hand cached blocks back to CUDA."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._eager_keys.clear()
