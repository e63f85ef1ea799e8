"""Stand-in gpu_check sections for tests/bench/test_gpu_check.py: each reports like a real one, without a GPU."""
import time


def passing(s):
    s.row(what="a check", max_abs=1e-4, passed=True)
    s.row(what="a measurement", ms=1.5)


def failing(s):
    s.row(what="good", passed=True)
    s.row(what="bad", max_abs=0.5, passed=False, error="max abs 0.5 > 0.005")


def crashing(s):
    s.row(what="before the crash", passed=True)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def skipping(s):
    s.skip("onnxruntime is not installed")


def hanging(s):
    s.row(what="written before the hang", passed=True)
    time.sleep(3600)


def slow_but_polite(s):
    """Stops starting work when its time is nearly up, as the real sections do."""
    n = 0
    while s.enough(1, f"step {n}"):
        s.row(what=f"step {n}", passed=True)
        n += 1
        time.sleep(0.5)
