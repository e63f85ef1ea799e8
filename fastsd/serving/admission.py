"""Shed or admit: how many requests a deployment takes at once, and when to come back.

A deployment runs `replicas up x images per engine call` requests at once (its running capacity) and lets
`--max-queue` more wait (default: one more full batch per replica, `replicas x --max-batch`, or
`--max-batch-limit` with auto). A request beyond that is refused at once, never queued to time out
later: gRPC RESOURCE_EXHAUSTED, HTTP 429. With no replica up it is refused too (gRPC UNAVAILABLE,
HTTP 503). Either refusal carries Retry-After: seconds until the queue ahead has drained at the
service rate measured over the last minute (requests answered per second of busy time), at least 1.

The load balancer keeps one `Admission` for every gRPC caller; the REST gateway keeps one for its
routes (`Gateway.admit`), so a busy gateway says no before it reads a body. Standard library only.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

WINDOW = 60.0  # seconds of history behind the service rate
MAX_RETRY_AFTER = 600
DOWN_RETRY_AFTER = 5  # no replica up: the supervisor restarts one within seconds


def default_max_queue(replicas: int, images_per_call: int) -> int:
    """--max-queue's default: one more full batch per replica."""
    return max(1, replicas * images_per_call)


class Admission:
    """`per_replica`: requests one replica runs at once (its images per engine call); `max_queue`:
    requests allowed to wait beyond those running. Thread-safe."""

    def __init__(self, per_replica: int, max_queue: int, clock=time.monotonic):
        self.per_replica = max(1, int(per_replica))
        self.max_queue = max(0, int(max_queue))
        self.clock = clock
        self.in_flight = 0
        self.admitted = self.shed = 0
        self._lock = threading.Lock()
        self._done: deque[float] = deque()          # when each recent request finished
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of recent busy stretches
        self._busy_since: float | None = None

    def limit(self, replicas_up: int) -> int:
        return replicas_up * self.per_replica + self.max_queue

    def try_admit(self, replicas_up: int) -> bool:
        """Admits (counts it in flight) or refuses one request; call `release` when an admitted one ends."""
        with self._lock:
            if replicas_up <= 0 or self.in_flight >= self.limit(replicas_up):
                self.shed += 1
                return False
            if self.in_flight == 0:
                self._busy_since = self.clock()
            self.in_flight += 1
            self.admitted += 1
            return True

    def release(self, answered: bool = True) -> None:
        """An admitted request ended; `answered`: it was served (counts toward the service rate)."""
        with self._lock:
            now = self.clock()
            self.in_flight = max(0, self.in_flight - 1)
            if answered:
                self._done.append(now)
            if self.in_flight == 0 and self._busy_since is not None:
                self._busy.append((self._busy_since, now))
                self._busy_since = None
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0] < now - WINDOW:
            self._done.popleft()
        while self._busy and self._busy[0][1] < now - WINDOW:
            self._busy.popleft()

    def service_rate(self) -> float | None:
        """Requests answered per second of busy time over the last minute; None before any was answered."""
        with self._lock:
            now = self.clock()
            self._trim(now)
            busy = sum(min(e, now) - max(s, now - WINDOW) for s, e in self._busy)
            if self._busy_since is not None:
                busy += now - max(self._busy_since, now - WINDOW)
            if not self._done or busy <= 0:
                return None
            return len(self._done) / busy

    def retry_after(self, replicas_up: int) -> int:
        """Seconds a refused caller should wait: the queue ahead of it drained at the measured rate."""
        if replicas_up <= 0:
            return DOWN_RETRY_AFTER
        rate = self.service_rate()
        if rate is None:
            return 1
        ahead = max(1, self.in_flight - replicas_up * self.per_replica + 1)
        return int(min(MAX_RETRY_AFTER, max(1, math.ceil(ahead / rate))))

    def snapshot(self) -> dict:
        rate = self.service_rate()
        return {"in_flight": self.in_flight, "admitted": self.admitted, "shed": self.shed,
                "max_queue": self.max_queue, "service_rate": round(rate, 4) if rate else None}
