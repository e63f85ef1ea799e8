"""`fastsd serve | stop`: starting a deployment (its options checked first, its spec and MII records
written, its supervisor started, then waiting until it answers) and stopping every process of it."""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InvalidParameter
from ..presets import PRESETS, get_preset
from . import control, proto, wire
from .client import DeploymentClient
from .errors import DeploymentError, ServingError
from .folders import cache_path, check_name, read_json, use_cache_path, write_json
from .image_urls import check_prefix
from .logs import FORMATS
from .ports import LOOPBACK, port_answers, port_free
from .processes import TOKEN_ENV, is_ours, signal_pid, wait_gone
from .records import IMAGE_TASK, plan_replicas, record_name, remove_records, write_records
from .request import Limits
from .spec import SPEC_FILE, DeploymentSpec
from .status import running_state

STALE_FILES = ("stopping", "state.json", "balancer.json", "score.py")


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_owner(port: int) -> str:
    """Which fastsd deployment, if any, says it uses this port (for the refusal message)."""
    for spec_path in cache_path().glob(f"*/{SPEC_FILE}"):
        try:
            spec = DeploymentSpec.read(spec_path.parent)
        except ServingError:  # another deployment's unreadable spec: not this refusal's business
            continue
        ports = {spec.port, spec.rest_port, spec.ui_port, spec.metrics_port, *[r.port for r in spec.replicas]}
        if port in ports and running_state(spec_path.parent):
            return f" (by fastsd deployment '{spec.name}')"
    return ""


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
                        batch_probe_steps=2, max_queue=None, tls_cert=None, tls_key=None) -> None:
    """Every `fastsd serve` option, before anything starts: a bad one is a one-line error naming it."""
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
    integer("--max-queue", max_queue, 0, 100_000, allow_none=True)
    control.check_tls(tls_cert, tls_key)
    if limits.image_url_allow:
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


def serve(*, name: str, model: str, replicas: int = 1, port: int = 50050, rest_port: int | None = None,
          ui_port: int | None = None,
          host: str = "127.0.0.1", token: str | None = None, gpus: list[int] | None = None,
          hostfile: str | None = None, max_batch: int | str = "auto", batch_window_ms: float = 20.0,
          max_batch_limit: int = 8, batch_min_gain: float = 0.10, batch_probe_steps: int = 2,
          limits: Limits | None = None, engine: dict | None = None, random_weights: bool = False,
          config: str | None = None, allow_pickle: bool = False, threads: int | None = None,
          max_body_bytes: int = 1 << 20, startup_timeout: float = 600.0, metrics_port: int | None = None,
          log_format: str = "text", ssh_config: str | None = None, echo=print,
          lora_dir: str | None = None, loras=(), max_queue: int | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, vae_tiny: str | None = None) -> DeploymentSpec:
    """Starts a persistent deployment and returns once it answers through MII's client. `lora_dir`: the
    folder whose LoRA files requests may name (`lora` keyword); `loras`: [(path, scale), ...] fused for
    requests that name none."""
    check_name(name)
    if lora_dir is not None:
        from .loras import LoraCatalog  # torch (fastsd.lora): only a deployment with --lora-dir needs it
        lora_dir = str(LoraCatalog(lora_dir).folder)
    limits = limits or Limits()
    check_serve_options(replicas=replicas, port=port, rest_port=rest_port, metrics_port=metrics_port,
                        max_batch=max_batch, batch_window_ms=batch_window_ms, limits=limits, threads=threads,
                        max_body_bytes=max_body_bytes, startup_timeout=startup_timeout, log_format=log_format,
                        ssh_config=ssh_config, token=token, host=host, hostfile=hostfile, model=model,
                        random_weights=random_weights, ui_port=ui_port, max_batch_limit=max_batch_limit,
                        batch_min_gain=batch_min_gain, batch_probe_steps=batch_probe_steps, max_queue=max_queue,
                        tls_cert=tls_cert, tls_key=tls_key)
    root = use_cache_path()
    ddir = root / name
    state = running_state(ddir)
    if state:
        try:
            running_port = DeploymentSpec.read(ddir).port
        except (ServingError, AttributeError):  # its spec is unreadable or gone: the pid says enough
            running_port = None
        raise ServingError(f"deployment '{name}' is already running (supervisor pid {state['supervisor_pid']}, "
                           f"port {running_port}); stop it first: fastsd stop {name}")
    if (ddir / "score.py").exists() and not (ddir / SPEC_FILE).exists():
        raise ServingError(f"{ddir / 'score.py'} is an MII deployment record not made by fastsd; "
                           f"choose another name or remove it")
    other = root / record_name(name, IMAGE_TASK)
    if (other / SPEC_FILE).exists() and running_state(other):
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
    _check_ports([r.port for r in plan if r.local], port, rest_port, host, ui_port, metrics_port)
    from ..kernels.memory import available_memory_bytes  # torch: `fastsd stop` and `status` do without it
    host_memory = available_memory_bytes("cpu")[0]  # before any replica loads: shared by the local ones
    for r in plan:  # each replica's batch sizes stay within its share (batch_size.py)
        r.host_replicas = sum(1 for o in plan if o.host == r.host)
        r.host_memory_bytes = host_memory if r.local else None

    spec = DeploymentSpec(
        name=name, model=model, random_weights=random_weights, config=config, allow_pickle=allow_pickle,
        engine=engine or {}, host=host, port=port, rest_port=rest_port, ui_port=ui_port, replicas=plan,
        max_batch=max_batch, batch_window_ms=batch_window_ms, max_batch_limit=max_batch_limit,
        batch_min_gain=batch_min_gain, batch_probe_steps=batch_probe_steps, limits=limits, threads=threads,
        max_body_bytes=max_body_bytes, metrics_port=metrics_port, log_format=log_format,
        ssh_config=str(Path(ssh_config).resolve()) if ssh_config else None, token_required=bool(token),
        created_at=time.time(), lora_dir=lora_dir,
        loras=[(str(Path(p).expanduser().resolve()), float(sc)) for p, sc in loras], max_queue=max_queue,
        tls_cert=str(Path(tls_cert).resolve()) if tls_cert else None,
        tls_key=str(Path(tls_key).resolve()) if tls_key else None,
        vae_tiny=str(Path(vae_tiny).expanduser().resolve()) if vae_tiny else None)
    spec.write(ddir)
    control.create_stop_key(ddir)  # what `fastsd stop` sends with Terminate; mode 0600
    write_records(mii_config)  # what mii_query_handle(record_name(name, task)) reads

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


def _wait_ready(ddir: Path, spec: DeploymentSpec, sup: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    n = len(spec.replicas)
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
            ready += bool(r.get("ready") and (r.get("pid") == pid or not spec.replicas[i].local))
        lb = port_answers(spec.port, spec.host)
        rest = not spec.rest_port or port_answers(spec.rest_port, spec.host)
        ui = not spec.ui_port or port_answers(spec.ui_port, spec.host)
        rest = rest and (not spec.metrics_port or port_answers(spec.metrics_port, spec.host))
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
    """Proves the path client -> load balancer -> replica -> pipeline with the client every front door
    uses (MII's stub and message): a request with no prompt is refused by the pipeline's validation
    without running the model. Marked as a probe, so no request count includes it."""
    try:
        DeploymentClient(name, timeout=timeout).generate([], probe=True)
    except DeploymentError as e:
        if e.code == "INVALID_ARGUMENT":
            return
        if e.code == "DEADLINE_EXCEEDED":
            raise ServingError(f"the deployment did not answer within {timeout:g} s") from None
        raise ServingError(f"the deployment does not answer as it should: {e.code}: {e}") from None


# -- stop ------------------------------------------------------------------------------------------
def _terminate(spec: DeploymentSpec, key: str | None) -> bool:
    """MII's Terminate to the load balancer, with the stop key (control.py): True when it was obeyed."""
    import grpc
    from google.protobuf import empty_pb2
    if not key:
        return False
    host = spec.host if spec.host in LOOPBACK else "127.0.0.1"  # the balancer's plain loopback listener
    channel = grpc.insecure_channel(f"{'[::1]' if host == '::1' else host}:{spec.port}")
    try:
        proto.stub(channel, proto.TERMINATE)(empty_pb2.Empty(), timeout=5, metadata=[(wire.STOP_KEY, key)])
        return True
    except grpc.RpcError:
        return False  # the balancer is down or stuck: the supervisor's signal does it
    finally:
        channel.close()


def stop(name: str, timeout: float = 30.0, quiet: bool = False, echo=print) -> dict:
    """Stops every process of the deployment and checks that no process or port is left."""
    check_name(name)
    ddir = cache_path() / name
    spec = DeploymentSpec.read(ddir)
    state = read_json(ddir / "state.json")
    if spec is None:
        raise ServingError(f"no deployment named '{name}' in {ddir.parent}")
    pids = []
    if state:
        pids = [state.get("supervisor_pid")] + [c.get("pid") for c in state.get("children", {}).values()]
    pids = [p for p in pids if p and is_ours(p, ddir)]
    if pids:
        _terminate(spec, control.read_stop_key(ddir))  # MII's Terminate with the key; the signals below back it up
    (ddir / "stopping").write_text("fastsd stop\n")
    sup = state.get("supervisor_pid") if state else None
    if sup and is_ours(sup, ddir):
        signal_pid(sup, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    for p in left:  # the supervisor did not manage: end what is still ours
        if is_ours(p, ddir):
            signal_pid(p, signal.SIGKILL)
    left = wait_gone(left, 5)
    ports = spec.local_ports()
    end = time.monotonic() + 5
    busy = ports
    while busy and time.monotonic() < end:
        busy = [p for p in ports if not port_free(p, spec.host)]
        if busy:
            time.sleep(0.1)
    remove_records(ddir.parent, name)
    st = read_json(ddir / "state.json") or {}
    if st.get("status") != "stopped":
        st.update(status="stopped", updated_at=time.time())
        write_json(ddir / "state.json", st)
    if left or busy:
        raise ServingError(f"deployment '{name}': processes {left} still alive, ports {busy} still in use")
    if not quiet:
        echo(f"stopped deployment '{name}': {len(pids)} process(es) ended, ports {', '.join(map(str, ports))} free")
    return {"processes": len(pids), "ports": ports}
