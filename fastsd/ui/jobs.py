"""The page's requests in flight: "step i of n" while one runs, and its Cancel.

Progress is the deployment's own record of each replica's engine call (fastsd.serving.progress, the files
A1111's /sdapi/v1/progress reads): while a request waits for its reply, the page shows the furthest-along
busy replica's step. With one user that is the user's request; with several sharing a deployment it is
the engine call running now, which may serve another page's request too.

Cancel stops only the requests of the page (browser tab) that asks: each request runs with a cancel
event (DeploymentClient.generate's `cancel`); Cancel sets its page's events, the client cancels the gRPC
call, and the replica stops the engine call at its next denoising step once no request of its batch is
still wanted (serving/batcher.py). Other users' requests run on, unlike A1111's /interrupt, which stops
whatever is running.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..serving import progress as progress_files

POLL_S = 0.2  # how often the page looks at the progress files while a request runs


class Jobs:
    """The cancel events of the requests in flight, by page session."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self.lock:
            self.running.setdefault(session, set()).add(event)
        return event

    def end(self, session: str, event: threading.Event) -> None:
        with self.lock:
            events = self.running.get(session, set())
            events.discard(event)
            if not events:
                self.running.pop(session, None)

    def cancel(self, session: str) -> int:
        """Cancel every request of this session in flight; returns how many."""
        with self.lock:
            events = list(self.running.get(session, ()))
        for e in events:
            e.set()
        return len(events)


def run(call, cancel: threading.Event, folder: Path, replicas: int, on_step):
    """`call(cancel)` on a worker thread; meanwhile `on_step(step, steps)` each time the deployment's
    progress changes. Returns the call's result; its exception propagates."""
    seen = None
    with ThreadPoolExecutor(1, thread_name_prefix="ui-request") as pool:
        future = pool.submit(call, cancel)
        try:
            while True:
                try:
                    return future.result(timeout=POLL_S)
                except TimeoutError:
                    pass
                # from step 1: step 0's count is the requested steps, before the scheduler says how many it
                # runs (image-to-image runs fewer)
                r = progress_files.furthest(folder, replicas)
                if r is not None and r["step"] > 0 and (r["step"], r["steps"]) != seen:
                    seen = (r["step"], r["steps"])
                    on_step(*seen)
        finally:
            if not future.done():  # left early (an exception on this thread): the request must not run on
                cancel.set()
