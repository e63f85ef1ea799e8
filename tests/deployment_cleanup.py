"""What every test that starts a deployment does when it ends: stop it, and kill whatever of it is
still alive, so no server outlives the test whatever happened."""
import os
import signal

from fastsd.serving import folders, processes


def end_deployment(name: str, ddir) -> None:
    state = folders.read_json(ddir / "state.json") or {}
    pids = [state.get("supervisor_pid")] + [c.get("pid") for c in state.get("children", {}).values()]
    try:
        if any(p and processes.is_ours(p, ddir) for p in pids):
            from fastsd.serving.deploy import stop
            stop(name, quiet=True)
    finally:
        for p in pids:
            if p and processes.is_ours(p, ddir):
                os.kill(p, signal.SIGKILL)
