"""Clocks, summary statistics and peak memory of the bench's calls."""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import torch


def summarize(runs: list[float]) -> dict:
    """median, min and p90 (linear interpolation) of the timed runs, in seconds."""
    if not runs:
        return {"runs_s": [], "median_s": None, "min_s": None, "p90_s": None}
    return {"runs_s": list(runs), "median_s": statistics.median(runs), "min_s": min(runs),
            "p90_s": float(np.percentile(runs, 90))}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory while a configuration runs: CUDA peak allocation on a GPU, peak resident memory of
    this process on the CPU (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere a
    20 ms sampling thread). `start()` after the configuration is built, `stop()` when its runs end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return
        self._peak = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            if _vm_hwm() is not None:
                self.method = "VmHWM (peak RSS)"
                return
        except OSError:
            pass
        self.method = "RSS sampled every 20 ms"
        self._stop.clear()

        def sample():
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, _rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            _sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            return max(self._peak, _rss())
        return max(_vm_hwm() or 0, _rss())

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _rss()


def timed_call(fn, device, cpu: list | None = None) -> float:
    """Wall seconds of one call; its process CPU seconds (all threads) go to `cpu`."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return wall
