"""Deadlines and cancellation in one process (issue 24, item 2): the engine stops between denoising steps
when its on_step hook raises, and the batcher answers a request past its deadline (or whose caller left) at once, stops the
engine at its next step when no request of the batch is still wanted, drops such requests while queued,
and leaves the other requests of a merged batch running."""
import threading
import time

import numpy as np
import pytest

from fastsd.errors import GenerationStopped
from fastsd.serving import batcher
from fastsd.serving.batcher import BatchingPipeline, RequestCancelled, RequestTimeout
from fastsd.serving.request import Limits


@pytest.fixture(scope="module")
def engine():
    from fastsd import load_model, optimize
    return optimize(load_model("tiny"), dtype="fp32")


class Counting:
    """Wraps the engine's backend to count UNet calls (one per denoising step) and make each take `delay` s."""

    def __init__(self, engine, delay=0.0):
        self.engine, self.delay, self.calls = engine, delay, 0
        self.unet = engine.backend.unet

    def __enter__(self):
        def unet(*a, **k):
            self.calls += 1
            time.sleep(self.delay)
            return self.unet(*a, **k)
        self.engine.backend.unet = unet
        return self

    def __exit__(self, *exc):
        self.engine.backend.unet = self.unet


def test_engine_stops_between_steps(engine):
    """The batcher's stop is the engine's on_step raising GenerationStopped: no step runs after it."""
    def stop_after_three(step, steps):
        if step == 3:
            raise GenerationStopped(f"stopped after step {step} of {steps}")
    with Counting(engine) as c, pytest.raises(GenerationStopped, match="after step 3 of "):
        engine.generate(["a"], num_inference_steps=20, seed=1, progress=False, on_step=stop_after_three)
    assert c.calls == 3


def test_deadline_answers_at_once_and_stops_the_engine(engine):
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=1, window=0.0)
    try:
        with Counting(engine, delay=0.05) as c:
            t = time.monotonic()
            with pytest.raises(RequestTimeout):
                pipe.handle(["a"], [""], {"num_inference_steps": 100}, deadline=time.monotonic() + 0.5)
            waited = time.monotonic() - t
            assert 0.45 <= waited < 1.0, waited  # answered at its deadline, not when the 100 steps are done
            assert _wait(lambda: pipe.stats.stopped_batches == 1)
            assert c.calls < 30, c.calls  # stopped at the next step, not run to the end
            t = time.monotonic()  # the replica is free again: a small request right after is answered at once
            reply = pipe.handle(["b"], [""], {"num_inference_steps": 2})
            assert len(reply.images) == 1 and time.monotonic() - t < 2.0
        assert pipe.stats.timeouts == 1 and pipe.stats.requests == 1
    finally:
        pipe.close()


def test_cancelled_caller_is_answered_and_its_batch_stopped(engine):
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=1, window=0.0)
    gone = threading.Event()
    try:
        with Counting(engine, delay=0.05) as c:
            threading.Timer(0.3, gone.set).start()
            t = time.monotonic()
            with pytest.raises(RequestCancelled):
                pipe.handle(["a"], [""], {"num_inference_steps": 100}, cancelled=gone)
            assert time.monotonic() - t < 0.8
            assert _wait(lambda: pipe.stats.stopped_batches == 1) and c.calls < 30
        assert pipe.stats.cancelled == 1
    finally:
        pipe.close()


def test_a_stop_the_worker_sees_first_is_counted_once(engine, monkeypatch):
    """The caller looks at its cancel event every WAIT_POLL s; with a long poll the worker stops the batch and
    answers first. The caller still hears RequestCancelled at once and the stats count it once."""
    monkeypatch.setattr(batcher, "WAIT_POLL", 5.0)
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=1, window=0.0)
    gone = threading.Event()
    try:
        with Counting(engine, delay=0.05):
            threading.Timer(0.3, gone.set).start()
            t = time.monotonic()
            with pytest.raises(RequestCancelled):
                pipe.handle(["a"], [""], {"num_inference_steps": 100}, cancelled=gone)
            assert time.monotonic() - t < 2.0
        assert (pipe.stats.cancelled, pipe.stats.timeouts, pipe.stats.stopped_batches) == (1, 0, 1)
    finally:
        pipe.close()


def test_merged_batch_keeps_the_requests_still_wanted(engine):
    """Two requests share one engine call; the first one's caller leaves: the other gets its image, the
    same image it gets alone."""
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=4, window=0.5)
    gone = threading.Event()
    out = {}

    def call(key, seed, cancelled=None):
        try:
            out[key] = pipe.handle(["a red cube"], [""], {"num_inference_steps": 8, "seed": seed}, cancelled=cancelled)
        except Exception as e:  # noqa: BLE001
            out[key] = e
    try:
        with Counting(engine, delay=0.05):
            ts = [threading.Thread(target=call, args=("left", 1, gone)), threading.Thread(target=call, args=("kept", 2))]
            [t.start() for t in ts]
            assert _wait(lambda: pipe.stats.batches == 0 and pipe.queue_depth() == 0, timeout=5)
            time.sleep(0.65)  # the two are merged and running
            gone.set()
            [t.join(60) for t in ts]
        assert isinstance(out["left"], RequestCancelled)
        kept = out["kept"]
        assert kept.batch_requests == 2 and pipe.stats.stopped_batches == 0
        alone = engine.generate(["a red cube"], [""], num_inference_steps=8, seed=2, progress=False).images[0]
        assert np.abs(np.asarray(kept.images[0], np.int16) - np.asarray(alone, np.int16)).max() <= 1
    finally:
        pipe.close()


def test_queued_request_past_its_deadline_never_runs(engine):
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=1, window=0.0)
    out = {}
    try:
        with Counting(engine, delay=0.05) as c:
            first = threading.Thread(target=lambda: out.setdefault(
                "first", pipe.handle(["a"], [""], {"num_inference_steps": 10})))
            first.start()
            time.sleep(0.2)  # the first one is running; the second waits behind it and times out there
            with pytest.raises(RequestTimeout):
                pipe.handle(["b"], [""], {"num_inference_steps": 10}, deadline=time.monotonic() + 0.2)
            first.join(30)
        assert len(out["first"].images) == 1
        assert c.calls <= 11 and pipe.stats.batches == 1  # the second was dropped from the queue (PNDM: 11 calls)
    finally:
        pipe.close()


def _wait(check, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()
