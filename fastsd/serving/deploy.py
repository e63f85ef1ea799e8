"""`fastsd serve | query | status | stop`: what each command does, as functions (the CLI is thin)."""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InvalidParameter
from .common import (LOOPBACK, TOKEN_ENV, ServingError, cache_path, check_name, connect_host, is_ours, pid_alive,
                     port_answers,
                     port_free, read_json, signal_pid, use_cache_path, wait_gone, write_json)
from .limits import Limits

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
STALE_FILES = ("stopping", "state.json", "balancer.json", "score.py")


def _is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host in (socket.gethostname(), socket.getfqdn())


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def running_state(ddir: Path) -> dict | None:
    """state.json when the deployment's supervisor is alive, else None."""
    state = read_json(ddir / "state.json")
    if state and state.get("status") != "stopped" and is_ours(state.get("supervisor_pid"), ddir):
        return state
    return None


def _port_owner(port: int) -> str:
    """Which fastsd deployment, if any, says it uses this port (for the refusal message)."""
    root = cache_path()
    for spec_path in root.glob("*/spec.json"):
        spec = read_json(spec_path) or {}
        ports = {spec.get("port"), spec.get("rest_port"), spec.get("ui_port"), spec.get("metrics_port"),
                 *[r.get("port") for r in spec.get("replicas", [])]}
        if port in ports and running_state(spec_path.parent):
            return f" (by fastsd deployment '{spec.get('name')}')"
    return ""


def import_mii():
    """MII, without DeepSpeed's start-up notices on a user's terminal: on a machine without CUDA,
    DS_ACCELERATOR=cpu says what DeepSpeed would otherwise guess (and warn about), and its
    deprecation notices about MII's own config fields are silenced."""
    import logging

    import torch
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import mii
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return mii


# -- serve -----------------------------------------------------------------------------------------
def _check_ports(replica_ports: list[int], port: int, rest_port: int | None, host: str,
                 ui_port: int | None = None, metrics_port: int | None = None) -> None:
    wanted = [(port, "load balancer (--port)")] + [(p, f"replica {i} (--port + {i + 1})")
                                                    for i, p in enumerate(replica_ports)]
    if rest_port:
        wanted.append((rest_port, "REST gateway (--rest-port)"))
    if ui_port:
        wanted.append((ui_port, "web page (--ui-port)"))
    if metrics_port:
        wanted.append((metrics_port, "metrics exporter (--metrics-port)"))
    seen = {}
    for p, what in wanted:
        if p in seen:
            raise ServingError(f"port {p} is asked for twice: {seen[p]} and {what}")
        seen[p] = what
        if not port_free(p, host):
            raise ServingError(f"port {p} for the {what} is already in use{_port_owner(p)}; "
                               "pick another with --port / --rest-port")


def check_serve_options(*, replicas, port, rest_port, metrics_port, max_batch, batch_window_ms, limits, threads,
                        max_body_bytes, startup_timeout, log_format, ssh_config, token, host, hostfile=None,
                        model=None, random_weights=False, ui_port=None, max_batch_limit=8, batch_min_gain=0.10,
                        batch_probe_steps=2) -> None:
    """Every `fastsd serve` option, before anything starts: a bad one is a one-line error naming it."""
    from .logs import FORMATS

    def integer(flag, value, lo, hi, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidParameter(flag, value, f"an integer in [{lo}, {hi}]")

    def number(flag, value, lo, hi):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise InvalidParameter(flag, value, f"a number in [{lo:g}, {hi:g}]")
    integer("--replicas", replicas, 1, 64)
    integer("--port", port, 1, 65535 - replicas)  # the replicas take the ports after it
    integer("--rest-port", rest_port, 1, 65535, allow_none=True)
    integer("--metrics-port", metrics_port, 1, 65535, allow_none=True)
    integer("--ui-port", ui_port, 1, 65535, allow_none=True)
    number("--batch-window-ms", batch_window_ms, 0, 10_000)
    integer("--threads", threads, 1, 1024, allow_none=True)
    integer("--max-body-bytes", max_body_bytes, 1024, 1 << 30)
    number("--startup-timeout", startup_timeout, 1, 24 * 3600)
    integer("--max-prompts", limits.max_prompts, 1, 1024)
    integer("--max-images", limits.max_images, 1, 1024)
    integer("--max-pixels", limits.max_pixels, 64 * 64, 2048 * 2048)
    integer("--max-steps", limits.max_steps, 1, 1000)
    number("--timeout", limits.timeout, 0.1, 24 * 3600)
    number("--image-url-timeout", limits.image_url_timeout, 0.1, 600)
    if limits.image_url_allow:
        from .image_urls import check_prefix
        limits.image_url_allow = tuple(check_prefix(p) for p in limits.image_url_allow)
        if rest_port is None:
            raise InvalidParameter("--image-url-allow", limits.image_url_allow[0],
                                   "only with --rest-port: the REST gateway fetches the allowed image URLs")
    if max_batch != "auto" and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                or not 1 <= max_batch <= 64):
        raise InvalidParameter("--max-batch", max_batch, "auto, or 1..64 images")
    if isinstance(max_batch_limit, bool) or not isinstance(max_batch_limit, int) or not 1 <= max_batch_limit <= 64:
        raise InvalidParameter("--max-batch-limit", max_batch_limit, "1..64 images")
    if not isinstance(batch_min_gain, (int, float)) or not 0 <= batch_min_gain <= 10:
        raise InvalidParameter("--batch-min-gain", batch_min_gain, "0..10 (0.1 = 10%)")
    if isinstance(batch_probe_steps, bool) or not isinstance(batch_probe_steps, int) \
            or not 1 <= batch_probe_steps <= limits.max_steps:
        raise InvalidParameter("--batch-probe-steps", batch_probe_steps, f"1..{limits.max_steps} (--max-steps)")
    if log_format not in FORMATS:
        raise InvalidParameter("--log-format", log_format, ", ".join(FORMATS))
    if hostfile is not None and not Path(hostfile).is_file():
        raise InvalidParameter("--hostfile", hostfile, "an existing hostfile ('HOST slots=N' lines)")
    if model is not None:
        _check_model(model, random_weights)
    if ssh_config is not None and not Path(ssh_config).is_file():
        raise InvalidParameter("--ssh-config", ssh_config, "an existing ssh config file")
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise InvalidParameter("--token", "<hidden>", "printable ASCII without spaces")
    if not isinstance(host, str) or not host:
        raise InvalidParameter("--host", host, "an address of this machine")
    if ui_port and not token and host not in LOOPBACK:
        raise InvalidParameter("--ui-port", ui_port, f"with --host {host}, a token (--token or $FASTSD_TOKEN): the page "
                               "would otherwise run the deployment for anyone who reaches it")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise InvalidParameter("--host", host, "an address of this machine") from None


def _check_model(model: str, random_weights: bool) -> None:
    """The model names something a replica can load (a preset, an existing path, a hub id), without
    loading it: a typo is refused here, not as a replica's traceback minutes later."""
    from ..presets import PRESETS, get_preset
    if get_preset(model) is not None:
        return
    allowed = f"a preset ({', '.join(PRESETS)}), an existing folder or checkpoint file, or a hub id (owner/name)"
    if random_weights:
        raise InvalidParameter("--model", model, f"a preset with --random-weights ({', '.join(PRESETS)})")
    if Path(model).expanduser().exists():
        return
    hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and Path(model).suffix == ""
    if not hub_id:
        raise InvalidParameter("--model", model, allowed)


def plan_replicas(name: str, ddir: Path, replicas: int, port: int, host: str, hostfile: str | None,
                  gpus: list[int] | None, model: str, on_gpu: bool = True) -> tuple[list[dict], object]:
    """Replica hosts and ports as MII lays them out (load balancer on `port`, replica i on port+1+i,
    hosts and slots from MII's hostfile), and MII's deployment record for them. A hostfile's slots
    are GPU indices only when the engine runs on CUDA (`on_gpu`); on CPU they only count replicas."""
    import_mii()
    from mii.legacy.config import MIIConfig, ModelConfig
    if hostfile is None:
        hostfile = str(ddir / "hostfile")
        Path(hostfile).write_text(f"localhost slots={replicas}\n")
    elif not Path(hostfile).is_file():
        raise ServingError(f"hostfile {hostfile}: no such file")
    try:
        cfg = MIIConfig(deployment_name=name, deployment_type="local", port_number=port, hostfile=hostfile,
                        model_conf=ModelConfig(model=model, task="text-to-image", skip_model_check=True,
                                               enable_deepspeed=False, replica_num=replicas))
        cfg.generate_replica_configs()
    except (ValueError, AssertionError) as e:
        raise ServingError(f"cannot place {replicas} replica(s) with hostfile {hostfile}: {e}") from None
    out = []
    for i, rc in enumerate(cfg.model_conf.replica_configs):
        local = _is_local(rc.hostname)
        if not local and host in ("127.0.0.1", "localhost", "::1"):
            raise ServingError(f"replica {i} is placed on host {rc.hostname} by the hostfile; remote replicas need "
                               "--host set to an address the other hosts reach (and a private network: MII's gRPC "
                               "has no authentication)")
        cvd = None
        if gpus:
            cvd = gpus[i % len(gpus)]
        elif hostfile != str(ddir / "hostfile") and rc.gpu_indices and on_gpu:
            cvd = ",".join(map(str, rc.gpu_indices))  # MII's slot -> GPU index, as its launcher does
        out.append({"index": i, "host": connect_host(host) if local else rc.hostname, "local": local,
                    "bind": host if local else "0.0.0.0", "port": rc.tensor_parallel_ports[0],
                    "cuda_visible_devices": cvd})
    return out, cfg


INPAINT_SUFFIX = "-inpaint"


def inpaint_record(mii_config):
    """The deployment record `NAME-inpaint`: the same ports, task text-to-image-inpainting."""
    cfg = mii_config.model_copy(deep=True) if hasattr(mii_config, "model_copy") else mii_config.copy(deep=True)
    cfg.deployment_name = mii_config.deployment_name + INPAINT_SUFFIX
    cfg.model_conf.task = "text-to-image-inpainting"
    return cfg


def serve(*, name: str, model: str, replicas: int = 1, port: int = 50050, rest_port: int | None = None,
          ui_port: int | None = None,
          host: str = "127.0.0.1", token: str | None = None, gpus: list[int] | None = None,
          hostfile: str | None = None, max_batch: int | str = "auto", batch_window_ms: float = 20.0,
          max_batch_limit: int = 8, batch_min_gain: float = 0.10, batch_probe_steps: int = 2,
          limits: Limits | None = None, engine: dict | None = None, random_weights: bool = False,
          config: str | None = None, allow_pickle: bool = False, threads: int | None = None,
          max_body_bytes: int = 1 << 20, startup_timeout: float = 600.0, metrics_port: int | None = None,
          log_format: str = "text", ssh_config: str | None = None, echo=print,
          lora_dir: str | None = None, loras=(), vae_tiny: str | None = None) -> dict:
    """Starts a persistent deployment and returns once it answers through MII's client. `lora_dir`: the
    folder whose LoRA files requests may name (`lora` keyword); `loras`: [(path, scale), ...] fused for
    requests that name none."""
    check_name(name)
    if lora_dir is not None:
        from .loras import LoraCatalog
        lora_dir = str(LoraCatalog(lora_dir).folder)
    limits = limits or Limits()
    check_serve_options(replicas=replicas, port=port, rest_port=rest_port, metrics_port=metrics_port,
                        max_batch=max_batch, batch_window_ms=batch_window_ms, limits=limits, threads=threads,
                        max_body_bytes=max_body_bytes, startup_timeout=startup_timeout, log_format=log_format,
                        ssh_config=ssh_config, token=token, host=host, hostfile=hostfile, model=model,
                        random_weights=random_weights, ui_port=ui_port, max_batch_limit=max_batch_limit,
                        batch_min_gain=batch_min_gain, batch_probe_steps=batch_probe_steps)
    root = use_cache_path()
    ddir = root / name
    state = running_state(ddir)
    if state:
        spec = read_json(ddir / "spec.json") or {}
        raise ServingError(f"deployment '{name}' is already running (supervisor pid {state['supervisor_pid']}, "
                           f"port {spec.get('port')}); stop it first: fastsd stop {name}")
    if (ddir / "score.py").exists() and not (ddir / "spec.json").exists():
        raise ServingError(f"{ddir / 'score.py'} is an MII deployment record not made by fastsd; "
                           f"choose another name or remove it")
    other = root / (name + INPAINT_SUFFIX)
    if (other / "spec.json").exists() and running_state(other):
        raise ServingError(f"deployment '{other.name}' is running, and '{name}' would take its name for its "
                           "inpainting record; choose another name")
    ddir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in STALE_FILES:
        (ddir / f).unlink(missing_ok=True)
    for f in ddir.glob("replica-*.json"):
        f.unlink()

    if hostfile is None:  # MII's layout, known without MII: check the ports before the slow import
        _check_ports([port + 1 + i for i in range(replicas)], port, rest_port, host, ui_port, metrics_port)
    on_gpu = bool(gpus) or str((engine or {}).get("device", "cpu")).startswith("cuda")
    plan, mii_config = plan_replicas(name, ddir, replicas, port, host, hostfile, gpus, model, on_gpu)
    _check_ports([r["port"] for r in plan if r["local"]], port, rest_port, host, ui_port, metrics_port)
    from ..kernels.memory import available_memory_bytes
    host_memory = available_memory_bytes("cpu")[0]  # before any replica loads: shared by the local ones
    for r in plan:  # each replica's batch sizes stay within its share (batch_size.py)
        r["host_replicas"] = sum(1 for o in plan if o["host"] == r["host"])
        r["host_memory_bytes"] = host_memory if r["local"] else None

    spec = {"name": name, "model": model, "random_weights": random_weights, "config": config,
            "allow_pickle": allow_pickle, "engine": engine or {}, "host": host, "port": port,
            "rest_port": rest_port, "ui_port": ui_port, "replicas": plan, "max_batch": max_batch,
            "batch_window_ms": batch_window_ms,
            "max_batch_limit": max_batch_limit, "batch_min_gain": batch_min_gain,
            "batch_probe_steps": batch_probe_steps,
            "limits": limits.to_dict(), "threads": threads, "max_body_bytes": max_body_bytes,
            "metrics_port": metrics_port, "log_format": log_format,
            "ssh_config": str(Path(ssh_config).resolve()) if ssh_config else None,
            "token_required": bool(token), "created_at": time.time(), "lora_dir": lora_dir,
            "loras": [[str(Path(p).expanduser().resolve()), float(sc)] for p, sc in loras],
            "vae_tiny": str(Path(vae_tiny).expanduser().resolve()) if vae_tiny else None}
    write_json(ddir / "spec.json", spec)
    from mii.legacy.models.score import create_score_file
    create_score_file(mii_config)  # MII's deployment record: what mii_query_handle(name) reads
    # MII's client takes the task from the record: NAME-inpaint sends InpaintingReply to the same servers
    create_score_file(inpaint_record(mii_config))

    env = dict(os.environ, MII_CACHE_PATH=str(root))
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = token  # to the REST gateway through the environment, never on a command line
    with open(ddir / "supervisor.log", "ab") as out:
        sup = subprocess.Popen([sys.executable, "-m", "fastsd.serving.supervisor", str(ddir)],
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True, close_fds=True)
    echo(f"starting deployment '{name}' (supervisor pid {sup.pid}; logs in {ddir})")
    try:
        _wait_ready(ddir, spec, sup, startup_timeout)
        _ping(name, min(60.0, startup_timeout))
    except BaseException:
        stop(name, quiet=True)
        raise
    return spec


def _wait_ready(ddir: Path, spec: dict, sup: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    n = len(spec["replicas"])
    while True:
        if sup.poll() is not None:
            raise ServingError(f"the supervisor exited with code {sup.returncode}:\n"
                               + _log_tail(ddir / "supervisor.log"))
        state = read_json(ddir / "state.json") or {}
        kids = state.get("children", {})
        for cname, c in kids.items():
            if c.get("restarts") or (c.get("last_exit") is not None):
                raise ServingError(f"{cname} exited during startup (code {c.get('last_exit')}); its log "
                                   f"{c.get('log')} ends with:\n" + _log_tail(Path(c["log"])))
        ready = 0
        for i in range(n):
            r = read_json(ddir / f"replica-{i}.json") or {}
            pid = kids.get(f"replica-{i}", {}).get("pid")
            ready += bool(r.get("ready") and (r.get("pid") == pid or not spec["replicas"][i]["local"]))
        lb = port_answers(spec["port"], spec["host"])
        rest = not spec.get("rest_port") or port_answers(spec["rest_port"], spec["host"])
        ui = not spec.get("ui_port") or port_answers(spec["ui_port"], spec["host"])
        rest = rest and (not spec.get("metrics_port") or port_answers(spec["metrics_port"], spec["host"]))
        seen = (read_json(ddir / "balancer.json") or {}).get("up") or []  # the balancer reaches them all
        if ready == n and lb and rest and ui and len(seen) == n and all(seen):
            return
        if time.monotonic() > end:
            raise ServingError(f"the deployment did not come up within {timeout:g} s ({ready}/{n} replicas ready, "
                               f"load balancer {'up' if lb else 'down'}, REST {'up' if rest else 'down'}, "
                               f"page {'up' if ui else 'down'}); "
                               f"logs in {ddir}")
        time.sleep(0.2)


def _ping(name: str, timeout: float) -> None:
    """Proves the path client -> load balancer -> replica -> pipeline with MII's own client (its stub
    and message): a request with no prompt is refused by the pipeline's validation without running
    the model."""
    import asyncio

    import grpc
    mii = import_mii()
    from mii.legacy.method_table import GRPC_METHOD_TABLE

    from .wire import PROBE
    client = mii.legacy.mii_query_handle(name)
    methods = GRPC_METHOD_TABLE[client.task]
    # marked as a probe (metadata), so no request count includes it
    call = getattr(client.stub, methods.method)(methods.pack_request_to_proto({"prompt": []}),
                                                metadata=[(PROBE, "1")])
    try:
        client.asyncio_loop.run_until_complete(asyncio.wait_for(call, timeout))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return
        raise ServingError(f"the deployment does not answer as it should: {e.code().name}: {e.details()}") from None
    except asyncio.TimeoutError:
        raise ServingError(f"the deployment did not answer within {timeout:g} s") from None


# -- stop ------------------------------------------------------------------------------------------
def stop(name: str, timeout: float = 30.0, quiet: bool = False, echo=print) -> dict:
    """Stops every process of the deployment and checks that no process or port is left."""
    check_name(name)
    ddir = cache_path() / name
    spec = read_json(ddir / "spec.json")
    state = read_json(ddir / "state.json")
    if spec is None:
        raise ServingError(f"no deployment named '{name}' in {ddir.parent}")
    pids = []
    if state:
        pids = [state.get("supervisor_pid")] + [c.get("pid") for c in state.get("children", {}).values()]
    pids = [p for p in pids if p and is_ours(p, ddir)]
    (ddir / "stopping").write_text("fastsd stop\n")
    sup = state.get("supervisor_pid") if state else None
    if sup and is_ours(sup, ddir):
        signal_pid(sup, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    for p in left:  # the supervisor did not manage: end what is still ours
        if is_ours(p, ddir):
            signal_pid(p, signal.SIGKILL)
    left = wait_gone(left, 5)
    ports = [spec["port"], *[r["port"] for r in spec["replicas"] if r.get("local", True)]]
    ports += [spec[k] for k in ("rest_port", "ui_port", "metrics_port") if spec.get(k)]
    end = time.monotonic() + 5
    busy = ports
    while busy and time.monotonic() < end:
        busy = [p for p in ports if not port_free(p, spec["host"])]
        if busy:
            time.sleep(0.1)
    (ddir / "score.py").unlink(missing_ok=True)
    (ddir.parent / (name + INPAINT_SUFFIX) / "score.py").unlink(missing_ok=True)
    st = read_json(ddir / "state.json") or {}
    if st.get("status") != "stopped":
        st.update(status="stopped", updated_at=time.time())
        write_json(ddir / "state.json", st)
    if left or busy:
        raise ServingError(f"deployment '{name}': processes {left} still alive, ports {busy} still in use")
    if not quiet:
        echo(f"stopped deployment '{name}': {len(pids)} process(es) ended, ports {', '.join(map(str, ports))} free")
    return {"processes": len(pids), "ports": ports}


# -- status ----------------------------------------------------------------------------------------
def status(name: str) -> dict:
    check_name(name)
    ddir = cache_path() / name
    spec = read_json(ddir / "spec.json")
    if spec is None:
        raise ServingError(f"no deployment named '{name}' in {ddir.parent}")
    state = read_json(ddir / "state.json") or {}
    running = running_state(ddir) is not None
    lb = read_json(ddir / "balancer.json") or {}
    kids = state.get("children", {})
    now = time.time()
    reps, totals = [], {}
    for i, r in enumerate(spec["replicas"]):
        info = read_json(ddir / f"replica-{i}.json") or {}
        child = kids.get(f"replica-{i}", {})
        alive = running and pid_alive(child.get("pid"))  # for a remote replica: its ssh session
        if r.get("local", True):
            this_run = info.get("pid") == child.get("pid")
        else:  # started after its ssh session was
            this_run = (info.get("started_at") or 0) >= (child.get("started_at") or 0) - 5
        lb_up = lb.get("up") or []
        reachable = bool(lb_up[i]) if i < len(lb_up) else True  # as the load balancer's probe sees it
        up = bool(alive and info.get("ready") and this_run and reachable)
        stats = info.get("stats", {})
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not k.startswith("max_"):
                totals[k] = totals.get(k, 0) + v
            elif isinstance(v, dict):
                continue  # histograms: per replica only
            elif k.startswith("max_"):
                totals[k] = max(totals.get(k, 0), v)
        reps.append({"index": i, "host": r["host"], "port": r["port"], "pid": child.get("pid"),
                     "state": "up" if up else ("unreachable" if alive and info.get("ready") and this_run
                                               else "starting" if alive else "down"),
                     "restarts": child.get("restarts", 0),
                     "cuda_visible_devices": r.get("cuda_visible_devices"),
                     "uptime_s": round(now - info["ready_at"], 1) if up and info.get("ready_at") else None,
                     "reachable": reachable, "queue_depth": info.get("queue_depth", 0) if up else 0,
                     "engine": info.get("engine"), "phase": info.get("phase"), "batching": info.get("batching"),
                     **stats})
    engine = next((r["engine"] for r in reps if r.get("engine")), None) or {}
    # a state file that says running with no supervisor alive: it was killed (its children end themselves)
    return {"name": name, "status": "running" if running else ("dead" if state.get("status") in ("running", "stopping")
                                                              else "stopped"),
            "model": spec["model"], "backend": engine.get("backend", spec["engine"].get("backend", "torch")),
            "device": engine.get("device"), "dtype": engine.get("dtype"), "host": spec["host"], "port": spec["port"],
            "rest_port": spec.get("rest_port"), "ui_port": spec.get("ui_port"), "token_required": spec.get("token_required", False),
            "supervisor_pid": state.get("supervisor_pid") if running else None,
            "uptime_s": round(now - state["started_at"], 1) if running and state.get("started_at") else None,
            "max_batch": spec["max_batch"], "max_batch_limit": spec.get("max_batch_limit"),
            "batch_min_gain": spec.get("batch_min_gain"), "batch_window_ms": spec["batch_window_ms"],
            "limits": spec["limits"],
            "requests_served": totals.get("requests", 0), "totals": totals, "replicas": reps,
            "balancer": {k: lb.get(k) for k in ("requests", "ok", "failovers", "errors", "forwarded", "up",
                                                "waited_for_replica", "marked_down", "in_flight", "images",
                                                "codes", "latency")},
            "metrics_port": spec.get("metrics_port"), "log_format": spec.get("log_format", "text"),
            "rest": kids.get("rest"), "dir": str(ddir), "mii_cache_path": str(ddir.parent),
            "lora_dir": spec.get("lora_dir"), "lora_default": spec.get("loras") or [],
            "lora_active": [(read_json(ddir / f"replica-{i}.json") or {}).get("loras") for i in range(len(reps))]}


def list_deployments() -> list[str]:
    return sorted(p.parent.name for p in cache_path().glob("*/spec.json"))


def format_status(s: dict) -> str:
    up = sum(r["state"] == "up" for r in s["replicas"])
    lines = [f"deployment {s['name']}: {s['status']}"
             + (f", up {s['uptime_s']:.0f} s (supervisor pid {s['supervisor_pid']})"
                if s["uptime_s"] is not None else ""),
             f"  model {s['model']}  backend {s['backend']}  device {s['device']}  dtype {s['dtype']}",
             f"  gRPC (MII) {s['host']}:{s['port']}" + (f"   REST http://{s['host']}:{s['rest_port']}/score"
                                                       + (" (bearer token)" if s["token_required"] else "")
                                                       if s["rest_port"] else "   REST off")
             + (f"   page http://{s['host']}:{s['ui_port']}/" if s.get("ui_port") else ""),
             f"  replicas {up}/{len(s['replicas'])} up; requests served {s['requests_served']}; "
             f"batching: {_batching_mode(s)}, window {s['batch_window_ms']:g} ms, "
             f"{s['totals'].get('batches', 0)} engine calls, {s['totals'].get('merged_batches', 0)} merged "
             f"({s['totals'].get('merged_requests', 0)} requests shared a batch)",
             f"  {'#':>2} {'state':<8} {'pid':>7} {'port':>6} {'restarts':>8} {'requests':>8} {'images':>6} "
             f"{'batches':>7} {'merged':>6} {'bad':>4} {'uptime':>8}"]
    for r in s["replicas"]:
        lines.append(f"  {r['index']:>2} {r['state']:<8} {r['pid'] or '-':>7} {r['port']:>6} {r['restarts']:>8} "
                     f"{r.get('requests', 0):>8} {r.get('images', 0):>6} {r.get('batches', 0):>7} "
                     f"{r.get('merged_batches', 0):>6} {r.get('bad_requests', 0):>4} "
                     f"{(str(round(r['uptime_s'])) + ' s') if r['uptime_s'] is not None else '-':>8}")
    lines += _batch_size_lines(s)
    if s.get("lora_dir"):
        n, secs = s["totals"].get("lora_switches", 0), s["totals"].get("lora_switch_seconds", 0.0)
        active = ["+".join(a["active"]) or "none" if a else "none" for a in s.get("lora_active", [])]
        lines.append(f"  LoRA: {s['lora_dir']}; {n} switches, {secs:.2f} s in all"
                     + (f" ({1000 * secs / n:.0f} ms each)" if n else "") + f"; fused now: {', '.join(active)}")
    b = s["balancer"]
    if b.get("requests") is not None:
        lines.append(f"  load balancer: {b['requests']} requests, {b['ok']} answered, {b['failovers']} failovers, "
                     f"errors {b['errors'] or {}}")
    lines.append(f"  logs: {s['dir']}")
    return "\n".join(lines)


def _batching_mode(s: dict) -> str:
    if s["max_batch"] == "auto":
        return (f"auto (measured, up to {s.get('max_batch_limit')} images, "
                f"each step up must gain {s.get('batch_min_gain') or 0:.0%})")
    return f"max {s['max_batch']} images"


def _batch_size_lines(s: dict) -> list[str]:
    """Per replica and bucket: the batch size chosen and the images/s measured at each size."""
    lines = []
    for r in s["replicas"]:
        b = r.get("batching") or {}
        if r.get("phase") and r["state"] != "up":
            lines.append(f"  replica {r['index']}: {r['phase']}")
        if b.get("memory_budget_bytes"):
            lines.append(f"  replica {r['index']} memory share {b['memory_budget_bytes'] / 2**30:.1f} GiB "
                         f"({b.get('memory_budget_source')})")
        for c in b.get("buckets", []):
            rates = ", ".join(f"{k}: {v:.3g}" for k, v in c["images_per_s"].items()) or "none yet"
            choice = f"{c['chosen']} per call" if c["chosen"] is not None else "measuring"
            lines.append(f"  replica {r['index']} {c['bucket']}: {choice}; images/s by batch size: {rates}"
                         + (f" ({c['reason']})" if c.get("reason") else ""))
    return lines


# -- query -----------------------------------------------------------------------------------------
def query(name: str, prompts: list[str], negative: str | None = None, timeout: float = 600.0,
          image: bytes | None = None, mask_image: bytes | None = None, **kwargs):
    """One request through MII's client, as user code sends it. With `image` (encoded bytes; and
    `mask_image`): image-to-image (inpainting) through MII's InpaintingReply RPC, on the `NAME-inpaint`
    deployment record that `serve` registers."""
    import asyncio

    import grpc

    from .client import image_request
    use_cache_path()
    check_name(name)
    if not (cache_path() / name / "score.py").exists():
        raise ServingError(f"no running deployment named '{name}' in {cache_path()} "
                           f"(set MII_CACHE_PATH to the folder the deployment was started with)")
    mii = import_mii()
    negatives = [negative if negative is not None else ""] * len(prompts)
    if image is not None:
        client = mii.legacy.mii_query_handle(name + "-inpaint")
        request = image_request(prompts, negatives, image, mask_image)
    else:
        client = mii.legacy.mii_query_handle(name)
        request = {"prompt": prompts, "negative_prompt": negatives}
    kw = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return client.asyncio_loop.run_until_complete(asyncio.wait_for(client._request_async_response(
            request, **kw), timeout))
    except grpc.aio.AioRpcError as e:
        raise ServingError(f"{e.code().name}: {e.details()}") from None
    except asyncio.TimeoutError:
        raise ServingError(f"no reply within {timeout:g} s") from None


def remove(name: str) -> None:
    """Deletes a stopped deployment's folder (logs included)."""
    ddir = cache_path() / check_name(name)
    if running_state(ddir):
        raise ServingError(f"deployment '{name}' is running; stop it first")
    shutil.rmtree(ddir, ignore_errors=True)
