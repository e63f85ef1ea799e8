"""The deployment's processes: what a supervisor passes its children in the environment, whether a
pid is alive and ours, signals, and how a child ends itself when its supervisor is gone.
Standard library only (the supervisor and `fastsd stop` import it)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

TOKEN_ENV = "FASTSD_TOKEN"  # the REST gateway's token: passed in the environment, never on a command line
PARENT_ENV = "FASTSD_SUPERVISOR_PID"
WATCH_STDIN_ENV = "FASTSD_WATCH_STDIN"


def pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def pid_cmdline(pid) -> str:
    try:
        return Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ours(pid, ddir: Path) -> bool:
    """True when `pid` is alive and is a fastsd serving process of deployment `ddir` (its command
    line names the folder), so a recycled pid is never signalled."""
    return pid_alive(pid) and str(ddir) in pid_cmdline(pid)


def signal_pid(pid, sig) -> bool:
    try:
        os.kill(int(pid), sig)
        return True
    except (ProcessLookupError, PermissionError, TypeError, ValueError):
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    """Waits until every pid has exited; returns those still alive at the timeout."""
    end = time.monotonic() + timeout
    left = [p for p in pids if p]
    while left and time.monotonic() < end:
        left = [p for p in left if pid_alive(p)]
        if left:
            time.sleep(0.05)
    return [p for p in left if pid_alive(p)]


def watch_parent(on_orphan, interval: float = 1.0) -> None:
    """Children of a supervisor end themselves when it is gone (killed with -9, say), so no server
    outlives its deployment. A replica on another host (started over ssh, FASTSD_WATCH_STDIN=1)
    watches its stdin instead: the supervisor holds the other end of it through ssh, and it reaches
    end-of-file when the ssh session ends (supervisor stopped or killed, connection lost)."""
    if os.environ.get(WATCH_STDIN_ENV) == "1":
        def read_to_eof():
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            on_orphan()
        threading.Thread(target=read_to_eof, name="ssh-watch", daemon=True).start()
        return
    expected = int(os.environ.get(PARENT_ENV) or 0)
    if not expected:
        return

    def loop():
        while True:
            time.sleep(interval)
            if os.getppid() != expected:
                on_orphan()
                return
    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def graceful_signals(stop) -> None:
    """SIGTERM and SIGINT call `stop()` (in the main thread)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())
