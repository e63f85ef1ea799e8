"""Where each replica's engine call is, step by step, and the deployment-wide interrupt: files in the
deployment folder, written by the replicas and read by the REST gateway (AUTOMATIC1111's `/progress` and
`/interrupt`, a1111_api.py).

- A replica's batcher calls `ReplicaProgress.begin` before an engine call, `step` after each denoising
  step (the engine's `on_step`), and `end` after it. `progress-I.json` holds {"busy", "step", "steps",
  "requests", "started", "updated"}; it is rewritten at most every WRITE_EVERY_S and on the last step, so a
  fast step costs no more than a stat.
- `interrupt(ddir)` writes `interrupt.json` with the time; every engine call that started before it stops at
  its next step with `Interrupted` (its requests answer gRPC ABORTED; HTTP 409 on /v1). Like A1111's
  interrupt, it stops what runs now, whichever caller's requests share that engine call; requests still
  queued run as usual.
Standard library only.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import FastSDError
from .folders import read_json, write_json

WRITE_EVERY_S = 0.2
INTERRUPT_FILE = "interrupt.json"


class Interrupted(FastSDError):
    """An engine call stopped by `interrupt` (POST /sdapi/v1/interrupt)."""


def progress_path(ddir: Path, index: int) -> Path:
    return Path(ddir) / f"progress-{index}.json"


def interrupt(ddir: Path) -> float:
    """Stop every engine call of the deployment running now, at its next step. Returns the time."""
    at = time.time()
    write_json(Path(ddir) / INTERRUPT_FILE, {"at": at})
    return at


def read(ddir: Path, replicas: int) -> list[dict]:
    """Each replica's progress record ({} for one that has written none)."""
    return [read_json(progress_path(ddir, i)) or {} for i in range(replicas)]


def furthest(ddir: Path, replicas: int) -> dict | None:
    """The busy replica whose engine call is furthest along, as {"step", "steps", "started"} (steps >= 1);
    None when no replica is busy. What A1111's /progress and the web page's "step i of n" show."""
    busy = [r for r in read(ddir, replicas) if r.get("busy")]
    if not busy:
        return None
    r = max(busy, key=lambda r: r.get("step", 0) / max(1, r.get("steps", 1)))
    return {"step": r.get("step", 0), "steps": max(1, r.get("steps", 1)), "started": r.get("started")}


class ReplicaProgress:
    def __init__(self, ddir: Path, index: int, clock=time.time):
        self.path = progress_path(ddir, index)
        self.interrupt_path = Path(ddir) / INTERRUPT_FILE
        self.clock = clock
        self.record: dict = {"busy": False}
        self._written = 0.0
        self.end()

    def begin(self, steps: int, requests: int) -> None:
        now = self.clock()
        self.record = {"busy": True, "step": 0, "steps": steps, "requests": requests, "started": now, "updated": now}
        self._write()

    def step(self, step: int, steps: int) -> None:
        """After denoising step `step` of `steps`: record it; raise Interrupted when an interrupt came after
        this engine call began."""
        now = self.clock()
        self.record.update(step=step, steps=steps, updated=now)
        if now - self._written >= WRITE_EVERY_S or step == steps:
            self._write()
        try:
            interrupted = os.stat(self.interrupt_path).st_mtime >= self.record["started"]
        except OSError:
            interrupted = False
        if interrupted and step < steps:
            raise Interrupted(f"interrupted at step {step} of {steps} (POST /sdapi/v1/interrupt)")

    def end(self) -> None:
        self.record = {"busy": False, "updated": self.clock()}
        self._write()

    def _write(self) -> None:
        self._written = self.clock()
        try:
            write_json(self.path, self.record)
        except OSError:  # progress is advisory: a full disk must not fail a request
            pass
