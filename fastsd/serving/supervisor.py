"""The supervisor: one light process per deployment (standard library only, no torch) that starts
the load balancer, the replicas, the REST gateway and the metrics exporter, restarts any of them that dies, and takes
them all down when the deployment is stopped.

    python -m fastsd.serving.supervisor DEPLOYMENT_DIR

`fastsd serve` starts it detached (its own session), so the deployment outlives the command.
- A child that exits while the deployment is not stopping is started again on the same port, after
  0.5 s, or with a growing delay (up to 30 s) when it keeps dying within 10 s of its start.
- The deployment stops when the file `stopping` appears (written by `fastsd stop`, or by the load
  balancer when MII's Terminate reaches it) or on SIGTERM/SIGINT: children get SIGTERM, then
  SIGKILL after 10 s, MII's score file is removed (so no client finds a dead deployment), and
  state.json says "stopped".
- Every child watches that its parent is still this process and ends itself otherwise, so even a
  supervisor killed with SIGKILL leaves no server behind.
- A replica that the load balancer has seen "stalled" (its port answers, its health check does not:
  SIGSTOP, a wedged process) for STALL_RESTART seconds is killed (SIGKILL) and so started again.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .folders import read_json, write_json
from .processes import PARENT_ENV, WATCH_STDIN_ENV, pid_alive
from .spec import DeploymentSpec

RESTART_DELAY, MAX_DELAY, QUICK_DEATH = 0.5, 30.0, 10.0
STALL_RESTART = 15.0  # seconds a replica may stay stalled (balancer.py's health check) before it is killed
# ssh gives up on a host that stops answering (15 s) instead of hanging, so the replica is restarted
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3"]


def _die_with_parent():
    """An ssh client ends with the supervisor, even one killed with SIGKILL (Linux PR_SET_PDEATHSIG),
    which ends the remote replica (its stdin closes)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ssh_command(spec: DeploymentSpec, host: str) -> list[str]:
    config = ["-F", spec.ssh_config] if spec.ssh_config else []
    return ["ssh", *SSH_OPTIONS, *config, host]


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "supervisor", msg, flush=True)


class Child:
    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, port: int, remote: list[str] | None):
        self.name, self.argv, self.env, self.log_path, self.port = name, argv, env, log_path, port
        self.remote = remote  # ["ssh", ..., host] for a replica on another host (hostfile)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.next_start = 0.0
        self.delay = RESTART_DELAY
        self.last_exit = None

    def start(self):
        argv = self.argv
        if self.remote:
            env_words = [f"{k}={v}" for k, v in self.env.items()
                         if k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MII_CACHE_PATH", "PYTHONUNBUFFERED")]
            # ssh hands the remote shell one string: quote each word
            argv = [*self.remote, " ".join(shlex.quote(w) for w in ["env", *env_words, f"{WATCH_STDIN_ENV}=1", *argv])]
        with open(self.log_path, "ab") as out:
            # a remote replica ends when its stdin (held open here, through ssh) closes: see watch_parent
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if self.remote else subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env, close_fds=True,
                                         preexec_fn=_die_with_parent if self.remote else None)
        self.started_at = time.time()
        log(f"{self.name}: started pid {self.proc.pid}" + (f" (port {self.port})" if self.port else ""))

    def info(self) -> dict:
        alive = self.proc is not None and self.proc.poll() is None
        return {"pid": self.proc.pid if self.proc else None, "port": self.port, "alive": alive,
                "restarts": self.restarts, "started_at": self.started_at, "last_exit": self.last_exit,
                "log": str(self.log_path)}


def kill_stalled(ddir: Path, children: list[Child], now: float) -> None:
    """SIGKILL a local replica the load balancer has seen stalled for STALL_RESTART seconds (restarted then)."""
    health = (read_json(ddir / "balancer.json") or {}).get("health") or []
    for i, h in enumerate(health):
        c = next((c for c in children if c.name == f"replica-{i}"), None)
        if c is None or c.proc is None or c.proc.poll() is not None or not isinstance(h, dict):
            continue
        since = h.get("since") or now
        if h.get("state") == "stalled" and now - since >= STALL_RESTART and since >= c.started_at:
            log(f"{c.name}: pid {c.proc.pid} stalled for {now - since:.0f} s ({h.get('why')}); killing it")
            c.proc.kill()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0]).resolve()
    spec = DeploymentSpec.read(ddir)
    stopping = {"why": None}

    def on_signal(signum, _frame):
        stopping["why"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    py = sys.executable
    base_env = dict(os.environ, **{PARENT_ENV: str(os.getpid()), "MII_CACHE_PATH": str(ddir.parent),
                                   "PYTHONUNBUFFERED": "1"})
    children: list[Child] = [Child("balancer", [py, "-m", "fastsd.serving.balancer", str(ddir)], base_env,
                                   ddir / "balancer.log", spec.port, None)]
    for i, r in enumerate(spec.replicas):
        env = dict(base_env)
        if r.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(r.cuda_visible_devices)
        remote = None if r.local else ssh_command(spec, r.host)
        children.append(Child(f"replica-{i}", [py, "-m", "fastsd.serving.replica", str(ddir), str(i)], env,
                              ddir / f"replica-{i}.log", r.port, remote))
    if spec.rest_port:
        children.append(Child("rest", [py, "-m", "fastsd.serving.rest", str(ddir)], base_env,
                              ddir / "rest.log", spec.rest_port, None))
    if spec.ui_port:  # the web page (fastsd.ui), a client of this deployment
        children.append(Child("ui", [py, "-m", "fastsd.ui", str(ddir)], base_env, ddir / "ui.log", spec.ui_port,
                              None))
    if spec.metrics_port:
        children.append(Child("metrics", [py, "-m", "fastsd.serving.metrics", str(ddir)], base_env,
                              ddir / "metrics.log", spec.metrics_port, None))

    started = time.time()

    def save(status: str):
        write_json(ddir / "state.json", {"status": status, "supervisor_pid": os.getpid(), "started_at": started,
                                         "updated_at": time.time(),
                                         "children": {c.name: c.info() for c in children}})

    log(f"deployment {spec.name}: model {spec.model}, {len(spec.replicas)} replica(s), "
        f"load balancer port {spec.port}" + (f", REST port {spec.rest_port}" if spec.rest_port else ""))
    for c in children:
        c.start()
    save("running")

    last_save = last_health = time.time()
    while stopping["why"] is None:
        if (ddir / "stopping").exists():
            stopping["why"] = "stop requested (" + (ddir / "stopping").read_text().strip() + ")"
            break
        changed = False
        now = time.time()
        for c in children:
            if c.proc is not None:
                code = c.proc.poll()
                if code is None:
                    continue
                c.last_exit = code
                lived = now - c.started_at
                c.delay = min(MAX_DELAY, c.delay * 2) if lived < QUICK_DEATH else RESTART_DELAY
                c.next_start = now + c.delay
                log(f"{c.name}: pid {c.proc.pid} exited with code {code} after {lived:.1f} s; "
                    f"restarting in {c.delay:g} s")
                c.proc = None
                changed = True
            elif now >= c.next_start and not (ddir / "stopping").exists():
                c.restarts += 1
                try:
                    c.start()
                except OSError as e:  # no process could be made (out of memory, a missing /dev/null, ...)
                    c.delay = min(MAX_DELAY, c.delay * 2)
                    c.next_start = now + c.delay
                    log(f"{c.name}: could not start ({e}); trying again in {c.delay:g} s")
                changed = True
        if now - last_health >= 1.0:
            last_health = now
            kill_stalled(ddir, children, now)
        if changed or now - last_save > 5:
            save("running")
            last_save = now
        time.sleep(0.1)

    log(f"stopping: {stopping['why']}")
    save("stopping")
    live = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for c in live:
        try:
            c.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + 10
    pending = list(live)
    while time.time() < end and pending:
        for c in [c for c in pending if c.proc.poll() is not None]:
            log(f"{c.name}: pid {c.proc.pid} exited ({c.proc.returncode}) after {time.time() - end + 10:.1f} s")
            pending.remove(c)
        time.sleep(0.05)
    for c in live:
        if c.proc.poll() is None:
            log(f"{c.name}: pid {c.proc.pid} ignored SIGTERM; killing it")
            c.proc.kill()
            c.proc.wait(5)
    score = ddir / "score.py"
    if score.exists():
        score.unlink()  # MII's record: no client should find a deployment that is gone
    save("stopped")
    log("stopped; no process of the deployment is left" if not any(pid_alive(c.info()["pid"]) for c in live)
        else "stopped, but some process did not exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
