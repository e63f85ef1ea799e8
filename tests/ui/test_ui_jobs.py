"""The page's request runner: "step i of n" from the deployment's progress files, and Cancel by page session."""
import threading
import time

import pytest

from fastsd.serving.progress import ReplicaProgress
from fastsd.ui.jobs import Jobs, run


def test_steps_are_reported_as_the_replica_writes_them(tmp_path):
    replica = ReplicaProgress(tmp_path, 0)
    seen = []

    def call(cancel):
        replica.begin(3, 1)
        for i in (1, 2, 3):
            time.sleep(0.25)  # longer than the page's poll (0.2 s): each step is seen
            replica.step(i, 3)
        time.sleep(0.25)
        replica.end()
        return "images"
    assert run(call, threading.Event(), tmp_path, 1, lambda i, n: seen.append((i, n))) == "images"
    assert seen[-1] == (3, 3) and [i for i, _ in seen] == sorted(i for i, _ in seen) and len(seen) >= 3


def test_cancel_sets_the_events_of_that_session_only(tmp_path):
    jobs = Jobs()
    mine, other = jobs.start("tab-a"), jobs.start("tab-b")
    assert jobs.cancel("tab-a") == 1 and mine.is_set() and not other.is_set()
    jobs.end("tab-a", mine)
    assert jobs.cancel("tab-a") == 0 and "tab-a" not in jobs.running


def test_a_cancelled_call_raises_and_an_abandoned_one_is_cancelled(tmp_path):
    cancel = threading.Event()

    def call(stop):
        assert stop is cancel
        stop.wait(10)
        raise RuntimeError("cancelled by the caller")
    threading.Timer(0.1, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cancelled by the caller"):
        run(call, cancel, tmp_path, 1, lambda i, n: None)
    assert time.monotonic() - t0 < 5

    # the page's thread leaves early (an exception in on_step): the request's cancel event is set
    stop2, started = threading.Event(), threading.Event()
    replica = ReplicaProgress(tmp_path, 0)

    def long_call(stop):
        replica.begin(10, 1)
        time.sleep(0.25)  # past progress.WRITE_EVERY_S: step 1 is written
        replica.step(1, 10)
        started.set()
        stop.wait(10)
        replica.end()
        return "late"

    def boom(i, n):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(long_call, stop2, tmp_path, 1, boom)
    assert stop2.is_set()
