"""Choosing the batch size from measured throughput (fastsd/serving/batch_size.py), with fake engines
whose throughput curve each test sets, and the batcher driven by it."""
import threading
import time
from types import SimpleNamespace

import pytest

from fastsd.errors import InvalidParameter
from fastsd.serving.batch_size import BatchSizer, Bucket, bucket_of, steps_bucket
from fastsd.serving.batcher import BatchingPipeline
from fastsd.serving.request import Limits, Request


def request(n=1, size=64, steps=4, guidance=7.5):
    return Request(prompts=["p"] * n, negatives=[""] * n, guidance=[guidance] * n, seeds=list(range(n)),
                   steps=steps, height=size, width=size, scheduler=None)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def curve_run(clock, images_per_s: dict, calls: list):
    """`run(n)` that advances a fake clock as a device with this throughput curve would."""
    def run(n):
        calls.append(n)
        clock.now += n / images_per_s[n]
        return n / images_per_s[n]
    return run


@pytest.mark.parametrize("curve,chosen,measured", [
    ({1: 10.0, 2: 19.0, 4: 34.0, 8: 36.0}, 4, [1, 2, 4, 8]),  # a GPU: flattens after 4 (8 gains 6%)
    ({1: 0.078, 2: 0.079, 4: 0.079, 8: 0.079}, 1, [1, 2]),    # a real-size model on a CPU: never pays
    ({1: 3.7, 2: 6.0, 4: 8.5, 8: 10.4}, 8, [1, 2, 4, 8]),      # the small model on a CPU: pays to the limit
    ({1: 5.0, 2: 5.4, 4: 9.0, 8: 9.0}, 1, [1, 2]),             # 8% < 10%: stops at the first rung that does not pay
])
def test_measure_picks_the_last_batch_that_pays(curve, chosen, measured):
    clock, calls = FakeClock(), []
    sizer = BatchSizer("auto", limit=8, min_gain=0.10, samples=2, cheap_seconds=1e9, clock=clock)
    c = sizer.measure(curve_run(clock, curve, calls), request(), steps=4)
    assert c.chosen == chosen and c.source == "start-up"
    assert sorted(set(calls)) == measured  # rungs above the first that did not pay are never run
    assert calls[0] == 1 and all(calls.count(b) == 2 + (b == 1) for b in measured)  # warm-up + 2 samples
    assert sizer.batch_for(request()) == chosen
    d = sizer.describe()["buckets"][0]
    assert d["chosen"] == chosen and d["images_per_s"]["1"] == pytest.approx(curve[1])
    assert "1-4 steps guided" in d["bucket"] and d["reason"]


def test_a_slow_call_is_measured_once_and_the_best_sample_counts():
    clock, calls = FakeClock(), []
    sizer = BatchSizer("auto", limit=4, cheap_seconds=2.0, clock=clock)
    sizer.measure(curve_run(clock, {1: 0.1, 2: 0.1}, calls), request(), steps=2)  # 10 s a call
    assert calls == [1, 1, 2]
    sizer = BatchSizer("auto", limit=2, samples=2, cheap_seconds=2.0)
    r = request()
    for secs in (0.5, 0.1):  # a first call slowed by a first-shape cost, then the real speed
        sizer.record(r, 1, 4, secs)
    sizer.record(r, 2, 4, 0.25)
    sizer.record(r, 2, 4, 0.3)
    assert sizer.curves[bucket_of(r)].chosen == 1  # 2 images in 0.25 s is not faster than 1 in 0.1 s


def test_online_measurement_climbs_the_ladder_on_live_calls():
    sizer = BatchSizer("auto", limit=4, samples=1)
    big = request(size=128, steps=30)
    assert sizer.batch_for(big) == 1  # nothing known: one image per call
    sizer.record(big, 1, 30, 1.0)
    assert sizer.batch_for(big) == 2  # next rung to measure
    sizer.record(big, 2, 30, 1.2)     # 1.67 images/s: +67%
    assert sizer.batch_for(big) == 4
    sizer.record(big, 3, 30, 2.0)     # an odd size is recorded but is not a rung
    assert sizer.batch_for(big) == 4
    sizer.record(big, 4, 30, 2.3)     # 1.74 images/s: +4%
    assert sizer.batch_for(big) == 2
    # other buckets are their own: another size, steps range or guidance on/off
    assert sizer.batch_for(request(size=128, steps=3)) == 1
    assert sizer.batch_for(request(size=128, steps=30, guidance=1.0)) == 1
    assert sizer.batch_for(request(size=64, steps=30)) == 1


def test_a_disturbed_start_up_measurement_is_corrected_by_a_live_call():
    """Seen at real size: the start-up batch-1 call ran at half speed (one sample per rung, 14 s calls), so
    2, 4 looked like gains and 4 was chosen; a live request alone then ran at the real batch-1 speed."""
    clock, calls = FakeClock(), []
    sizer = BatchSizer("auto", limit=8, cheap_seconds=2.0, clock=clock)
    disturbed = {1: 0.03, 2: 0.0386, 4: 0.0504, 8: 0.0478}
    c = sizer.measure(curve_run(clock, disturbed, calls), request(size=512, steps=2), steps=2)
    assert c.chosen == 4
    r = request(size=512, steps=2)
    sizer.record(r, 4, 2, 4 / 0.0504)  # a live batch of 4 at its measured speed changes nothing
    assert sizer.batch_for(r) == 4
    sizer.record(r, 1, 2, 1 / 0.0721)  # a request alone, at the real batch-1 speed: 1 beats 2 and 4
    assert sizer.batch_for(r) == 1
    assert "gain" in sizer.describe()["buckets"][0]["reason"]


def test_steps_buckets_and_bucket_key():
    assert [steps_bucket(s) for s in (1, 4, 5, 16, 17, 50, 64, 65, 1000)] == \
        ["1-4", "1-4", "5-16", "5-16", "17-64", "17-64", "17-64", "65-256", "257-1000"]
    assert bucket_of(request(size=96, steps=25)) == Bucket("text2img", 96, 96, "17-64", True)
    task = SimpleNamespace(**{**vars(request()), "task": "img2img"})  # a request of another task
    assert bucket_of(task).task == "img2img"


def test_memory_caps_the_batch_and_refuses_what_cannot_fit():
    gib = 2**30
    # 5 GiB held + 1 GiB per image (2 with guidance at 128x128), 8 GiB share
    need = lambda b, h, w, g: 5 * gib + b * gib * (2 if g else 1) * (h * w) // (64 * 64)  # noqa: E731
    sizer = BatchSizer("auto", limit=8, samples=1, need=need, budget_bytes=8 * gib, budget_source="test")
    clock, calls = FakeClock(), []
    sizer.clock = clock
    c = sizer.measure(curve_run(clock, {1: 1.0, 2: 2.0, 4: 4.0}, calls), request(), steps=4)
    assert c.chosen == 1 and "memory" in c.reason and 2 not in calls  # 2 guided images need 9 GiB
    assert sizer.batch_for(request(guidance=1.0)) == 1  # unguided: measuring (2 fit, 1 first)
    sizer.admit(request(n=3, guidance=1.0))
    with pytest.raises(InvalidParameter) as e:
        sizer.admit(request(n=4, guidance=1.0))
    assert e.value.name == "num_images_per_prompt" and "at most 3" in str(e.value)
    with pytest.raises(InvalidParameter) as e:
        sizer.admit(request(size=128))  # one guided 128x128 image needs 13 GiB
    assert e.value.name == "height x width" and "8.0 GiB" in str(e.value)
    forced = BatchSizer(8, need=need, budget_bytes=8 * gib)
    assert forced.batch_for(request(guidance=1.0)) == 3 and forced.batch_for(request(n=2)) == 1


def test_a_number_forces_the_batch_size():
    sizer = BatchSizer(3)
    assert sizer.ladder == [1, 2, 3] and sizer.batch_for(request()) == 3
    sizer.record(request(), 1, 4, 10.0)
    assert sizer.batch_for(request()) == 3 and sizer.describe()["mode"] == 3
    assert BatchSizer("auto", limit=6).ladder == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        BatchSizer("fast")


# -- the batcher, driven by the sizer ---------------------------------------------------------------
class CurveEngine:
    """Sleeps as long as a device with this throughput curve (images/s by batch size) would."""
    class model:
        native_size = 64

    def __init__(self, images_per_s: dict):
        self.images_per_s, self.calls = images_per_s, []

    def generate(self, prompts, negatives, *, seed, **kw):
        n = len(prompts)
        self.calls.append(list(prompts))
        time.sleep(n / self.images_per_s[n])
        return SimpleNamespace(images=[f"image of {p}" for p in prompts], nsfw_content_detected=[False] * n,
                               seeds=list(seed))


def burst(pipe, prompts, in_order=False):
    """One request per prompt, each from its own thread; `in_order`: each queued before the next starts."""
    out = {}

    def call(p):
        out[p] = pipe(prompt=[p], negative_prompt=[""], num_inference_steps=4, seed=1)
    threads = []
    for p in prompts:
        queued = pipe._queue.qsize()
        threads.append(threading.Thread(target=call, args=(p,)))
        threads[-1].start()
        end = time.monotonic() + 5
        while in_order and pipe._queue.qsize() == queued and time.monotonic() < end:
            time.sleep(0.001)
    [t.join(30) for t in threads]
    return out


def test_batcher_stops_merging_where_batching_does_not_pay():
    engine = CurveEngine({1: 50.0, 2: 50.0, 4: 50.0, 8: 50.0})  # 20 ms per image at any batch
    sizer = BatchSizer("auto", limit=8, samples=2, cheap_seconds=10.0)
    pipe = BatchingPipeline(engine, Limits(timeout=30), window=0.5, sizer=sizer)
    try:
        sizer.measure(lambda n: (engine.generate(["w"] * n, [""] * n, seed=[0] * n), n / 50.0)[1], request(), 4)
        assert sizer.batch_for(request()) == 1
        engine.calls.clear()
        t = time.monotonic()
        out = burst(pipe, [f"r{i}" for i in range(6)])
        assert len(out) == 6 and all(len(c) == 1 for c in engine.calls)
        assert time.monotonic() - t < 0.5 + 6 * 0.02  # a batch of one does not wait out the window
        assert out["r3"].images == ["image of r3"]
    finally:
        pipe.close()


def test_batcher_merges_where_it_pays_and_serves_the_oldest_first():
    engine = CurveEngine({1: 20.0, 2: 40.0, 4: 80.0, 8: 80.0})
    sizer = BatchSizer("auto", limit=8, samples=1, cheap_seconds=0.0)
    sizer.measure(lambda n: n / engine.images_per_s[n], request(), 4)
    assert sizer.batch_for(request()) == 4
    pipe = BatchingPipeline(engine, Limits(timeout=30), window=0.05, sizer=sizer)
    try:
        gate, held = threading.Event(), threading.Event()
        real = engine.generate
        engine.generate = lambda *a, **k: (held.set(), gate.wait(5), real(*a, **k))[2]  # hold the first call
        first = threading.Thread(target=burst, args=(pipe, ["first"]))
        first.start()
        assert held.wait(5)
        # 6 requests queue up, in this order, behind the held call; a batch takes the 4 oldest
        later = threading.Thread(target=burst, args=(pipe, [f"q{i}" for i in range(6)], True))
        later.start()
        end = time.monotonic() + 5
        while pipe._queue.qsize() < 6 and time.monotonic() < end:
            time.sleep(0.005)
        gate.set()
        first.join(10)
        later.join(10)
        assert engine.calls[0] == ["first"]
        assert engine.calls[1] == ["q0", "q1", "q2", "q3"] and engine.calls[2] == ["q4", "q5"]
        assert pipe.stats.max_batch_images == 4
    finally:
        pipe.close()


def test_the_window_bounds_the_wait():
    engine = CurveEngine({1: 1000.0, 2: 2000.0, 4: 4000.0, 8: 8000.0})
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=8, window=0.15)  # a forced 8
    try:
        t = time.monotonic()
        burst(pipe, ["alone"])
        waited = time.monotonic() - t
        assert 0.14 <= waited < 0.6 and engine.calls == [["alone"]]
    finally:
        pipe.close()


def test_a_request_too_big_for_memory_is_refused_and_the_server_goes_on():
    gib = 2**30
    engine = CurveEngine({1: 1000.0, 2: 2000.0})
    sizer = BatchSizer(2, need=lambda b, h, w, g: b * gib * (4 if h > 64 else 1), budget_bytes=2 * gib,
                       budget_source="test")
    pipe = BatchingPipeline(engine, Limits(timeout=30), window=0.0, sizer=sizer)
    try:
        with pytest.raises(InvalidParameter, match="^height x width"):
            pipe(prompt=["big"], negative_prompt=[""], height=128, width=128)
        with pytest.raises(InvalidParameter, match="^num_images_per_prompt"):
            pipe(prompt=["many"], negative_prompt=[""], num_images_per_prompt=3)
        assert pipe(prompt=["ok"], negative_prompt=[""], num_inference_steps=2).images == ["image of ok"]
        assert pipe.stats.bad_requests == 2
    finally:
        pipe.close()


@pytest.mark.parametrize("kw,name", [({"max_batch": "fast"}, "--max-batch"), ({"max_batch": 0}, "--max-batch"),
                                     ({"max_batch_limit": 65}, "--max-batch-limit"),
                                     ({"batch_min_gain": -0.1}, "--batch-min-gain"),
                                     ({"batch_probe_steps": 0}, "--batch-probe-steps")])
def test_serve_refuses_bad_batching_options_before_starting_anything(kw, name):
    from fastsd.errors import InvalidParameter
    from fastsd.serving.deploy import serve
    with pytest.raises(InvalidParameter, match=f"^{name}: got"):
        serve(name="never-started", model="tiny", **kw)


def test_cli_max_batch_takes_auto_or_a_number():
    import subprocess
    import sys
    bad = subprocess.run([sys.executable, "-m", "fastsd.cli", "serve", "--deployment", "x", "--max-batch", "lots"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--max-batch" in bad.stderr and "auto" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2  # usage + one line, no traceback
