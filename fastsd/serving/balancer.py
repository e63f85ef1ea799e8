"""The deployment's front door: MII's load-balancer service, made health-aware.

    python -m fastsd.serving.balancer DEPLOYMENT_DIR

MII's load balancer is a gRPC server whose servicer (`ServiceBase`) does nothing but Terminate and
whose interceptor (`LoadBalancingInterceptor`) sends call k to replica k mod N, whatever state that
replica is in: a dead replica keeps getting its share and every such call fails with UNAVAILABLE.
This process serves the same service on the same port (MII's proto, through proto.py, without MII's
package: no torch here; clients see no difference) with routing of our own in place of MII's round-robin:
- it sends a call to the next replica that is up (round-robin over the healthy ones);
- admission (admission.py): at most `replicas up x images per call + --max-queue` calls in flight; a
  call beyond that gets RESOURCE_EXHAUSTED at once, and with no replica up UNAVAILABLE at once, both
  with a Retry-After (`fastsd-retry-after` trailing metadata) from the measured service rate;
- a call that fails with UNAVAILABLE (connection refused or reset: the replica died or is
  restarting) is sent again to another replica, so no request is lost to a dead replica, including
  one in flight when it died (generation with a seed is idempotent); an admitted call that finds no
  replica up waits for one until its deadline;
- health: a probe thread per replica connects to its port and calls the standard gRPC health service
  (grpc.health.v1) four times a second with a short deadline (HEALTH_TIMEOUT). A replica whose port does
  not answer is down; one whose port answers but whose health call does not (stopped with SIGSTOP,
  wedged) is down as "stalled" after STALLED_AFTER misses, and the supervisor restarts it when it stays
  stalled (supervisor.STALL_RESTART); one that answers again is put back;
- a call in flight on a replica that is marked down is cancelled and sent to another replica;
- a call whose caller goes away (cancelled, disconnected) is cancelled on its replica too, and a call
  past its deadline ends there: the replica stops its engine at the next step (batcher.py);
- any other status (INVALID_ARGUMENT with the reason, DEADLINE_EXCEEDED, ...) reaches the client
  as the replica sent it (MII's interceptor would turn it into UNKNOWN);
- each call gets a request id (the caller's `x-request-id` metadata, else a new one), passed to the
  replica and sent back in the trailing metadata, and one access-log line; its status, latency
  (end to end, and the replica's queue wait and engine time) and images go into balancer.json,
  which `fastsd status` and the Prometheus exporter (metrics.py) read; the deployment's own probes
  (`fastsd-probe` metadata) are answered but not counted;
- every call has a deadline: the client's, capped by the deployment's per-request timeout;
- Terminate is obeyed only with the deployment's stop key (control.py; `fastsd stop` sends it): it
  marks the deployment as stopping, so the supervisor restarts nothing and takes every process down,
  forwards Terminate to each replica that is up, then stops this server. Without the key:
  PERMISSION_DENIED, and nothing changes;
- with a token and a --host other than loopback, a call from a peer other than loopback must carry
  `authorization: Bearer TOKEN` (UNAUTHENTICATED otherwise); with --tls-cert/--tls-key the --host
  listener is TLS.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from . import control, logs, proto, wire
from .admission import Admission
from .folders import read_json, write_json
from .histograms import LATENCY_BOUNDS, hist_new, hist_observe
from .ports import LOOPBACK, connect_host, grpc_address, port_answers
from .processes import TOKEN_ENV, graceful_signals, watch_parent
from .records import IMAGE_TASK, TEXT_TO_IMAGE
from .spec import DeploymentSpec

log = logging.getLogger("fastsd.serving.balancer")
TASKS = {"Txt2ImgReply": TEXT_TO_IMAGE, "InpaintingReply": IMAGE_TASK}  # MII's method -> task
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]
PROBE_INTERVAL = 0.25
HEALTH_TIMEOUT = 2.0  # seconds a replica's health call may take
STALLED_AFTER = 2     # health calls missed in a row before a replica whose port answers is marked down


class HealthAwareBalancer:
    def __init__(self, spec: DeploymentSpec, ddir: Path, token: str | None = None, stop_key: str | None = None):
        import grpc

        self.grpc = grpc
        self.spec = spec
        self.targets = [(connect_host(r.host), r.port) for r in spec.replicas]
        self.timeout = spec.limits.timeout
        self.ddir = ddir
        self.token, self.stop_key = token, stop_key
        self.admission = Admission(spec.max_images_per_call, spec.queue_limit)
        self.next = 0
        self.lock = threading.Lock()
        self.stubs = [self._stubs(i) for i in range(len(self.targets))]
        self.up = [port_answers(p, h, 0.3) for h, p in self.targets]
        self.health = [{"state": "up" if u else "down", "since": time.time(), "why": ""} for u in self.up]
        self.stats = {"requests": 0, "ok": 0, "failovers": 0, "waited_for_replica": 0, "in_flight": 0, "images": 0,
                      "shed": 0, "cancelled": 0, "errors": {}, "codes": {}, "forwarded": [0] * len(self.targets),
                      "marked_down": [0] * len(self.targets),
                      "latency": {k: hist_new(LATENCY_BOUNDS) for k in ("queue", "engine", "total")}}
        previous = read_json(ddir / "balancer.json") or {}  # counters run on across restarts, as a replica's do
        for k, v in previous.items():
            if k in self.stats and k != "in_flight" and type(v) is type(self.stats[k]) \
                    and (not isinstance(v, list) or len(v) == len(self.targets)):
                self.stats[k] = v
        self._stop = threading.Event()
        for i in range(len(self.targets)):
            threading.Thread(target=self._probe, args=(i,), name=f"probe-{i}", daemon=True).start()

    # -- replicas ------------------------------------------------------------------------------
    def _stubs(self, i) -> dict:
        """A fresh channel to replica i (no reconnect backoff left over): a callable per method, and health."""
        from grpc_health.v1 import health_pb2_grpc
        host, port = self.targets[i]
        channel = self.grpc.insecure_channel(grpc_address(host, port),
                                             options=[*proto.MESSAGE_OPTIONS, *CHANNEL_OPTIONS])
        out = {m: proto.stub(channel, m) for m in proto.methods()}
        out["health"] = health_pb2_grpc.HealthStub(channel)
        return out

    def _set_up(self, i: int, up: bool, why: str = "", state: str | None = None):
        state = state or ("up" if up else "down")
        with self.lock:
            if self.up[i] == up and self.health[i]["state"] == state:
                return
            changed = self.up[i] != up
            self.up[i] = up
            self.health[i] = {"state": state, "since": time.time(), "why": why}
            if up:
                self.stubs[i] = self._stubs(i)
            elif changed:
                self.stats["marked_down"][i] += 1
        log.warning("replica %d (%s:%d) is %s%s", i, *self.targets[i], state.upper() if not up else "up",
                    f": {why}" if why else "")

    def _probe(self, i: int):
        """Replica i's health, four times a second: its port, then the gRPC health service."""
        from grpc_health.v1 import health_pb2
        host, port = self.targets[i]
        misses = 0
        while not self._stop.wait(PROBE_INTERVAL):
            if not port_answers(port, host, 0.5):
                misses = 0
                self._set_up(i, False, "its port does not answer")
                continue
            try:
                reply = self.stubs[i]["health"].Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except self.grpc.RpcError as e:
                if e.code() == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                    misses += 1
                    if misses >= STALLED_AFTER:
                        self._set_up(i, False, f"stalled: its health check did not answer within "
                                               f"{HEALTH_TIMEOUT:g} s, {misses} times in a row", "stalled")
                    continue
                serving = False  # UNAVAILABLE: starting, stopping, or a refused connection
            misses = 0
            self._set_up(i, serving, "" if serving else "its health check says it is not serving")

    def replicas_up(self) -> int:
        with self.lock:
            return sum(self.up)

    def _pick(self, avoid: set[int]):
        with self.lock:
            healthy = [i for i, u in enumerate(self.up) if u]
            if not healthy:
                return None
            preferred = [i for i in healthy if i not in avoid] or healthy
            self.next += 1
            return preferred[self.next % len(preferred)]

    # -- calls ---------------------------------------------------------------------------------
    def forward(self, method: str, request, context):
        grpc = self.grpc
        meta = wire.metadata(context)
        probe = wire.PROBE in meta  # the deployment's own readiness check: answered, never counted
        rid = wire.request_id(meta.get(wire.REQUEST_ID))
        out_meta = [(wire.REQUEST_ID, rid)] + ([(wire.PROBE, "1")] if probe else [])
        task = TASKS.get(method, method)
        t_start = time.monotonic()
        if not control.may_query(meta, context.peer(), self.token):
            context.set_trailing_metadata([(wire.REQUEST_ID, rid)])
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this deployment needs its token: metadata authorization: Bearer <token>")
        remaining = context.time_remaining()
        deadline = t_start + min(self.timeout, remaining if remaining is not None else self.timeout)
        admitted = probe or self.admission.try_admit(self.replicas_up())
        if not probe:
            with self.lock:
                self.stats["requests"] += 1
                self.stats["in_flight"] += 1
        code, trail, replica = grpc.StatusCode.UNKNOWN, {}, None  # what is counted if routing itself fails
        try:
            if not admitted:
                up = self.replicas_up()
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if up else grpc.StatusCode.UNAVAILABLE
                trail = {wire.RETRY_AFTER: str(self.admission.retry_after(up))}
                self._count("shed")
                context.set_trailing_metadata([(wire.REQUEST_ID, rid), *trail.items()])
                context.abort(code, "the deployment is at capacity; retry later" if up else
                              "no replica of the deployment is up; retry later")
            reply, code, detail, trail, replica = self._route(method, request, deadline, out_meta, context)
            context.set_trailing_metadata([(wire.REQUEST_ID, rid), *[(k, v) for k, v in trail.items()
                                                                     if k.startswith("fastsd-")]])
            if code != grpc.StatusCode.OK:
                context.abort(code, detail)
            return reply
        finally:
            if admitted and not probe:
                self.admission.release(answered=code == grpc.StatusCode.OK)
            if not probe:
                self._record(task, code, time.monotonic() - t_start, trail, replica, rid, request)

    def _route(self, method, request, deadline, out_meta, context):
        """-> (reply, code, details, the replica's trailing metadata, replica index)."""
        grpc = self.grpc
        tried: set[int] = set()
        waited = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, grpc.StatusCode.DEADLINE_EXCEEDED, (
                    f"no reply within the request's deadline ({self.timeout:g} s at most)" if tried or not waited
                    else "no replica of the deployment came up before the request's deadline"), {}, None
            if not context.is_active():
                self._count("cancelled")
                return None, grpc.StatusCode.CANCELLED, "the caller went away", {}, None
            i = self._pick(tried)
            if i is None:  # every replica is down or restarting: an admitted call waits for one
                if not waited:
                    waited = True
                    self._count("waited_for_replica")
                time.sleep(min(0.1, max(0.0, left)))
                continue
            tried.add(i)
            call = self.stubs[i][method].future(request, timeout=left, metadata=out_meta)
            gone = False
            while not call.done():
                if not self.up[i]:  # the probe lost the replica (died, stalled, its host went away)
                    call.cancel()
                    break
                if not context.is_active():  # the caller cancelled or went away: so does the replica's call
                    gone = True
                    call.cancel()
                    break
                try:
                    call.result(timeout=0.1)
                except (grpc.FutureTimeoutError, grpc.FutureCancelledError, grpc.RpcError):
                    pass  # the outcome is read below
            if gone:
                self._count("cancelled")
                return None, grpc.StatusCode.CANCELLED, "the caller went away", {}, i
            try:
                reply = call.result()
            except grpc.FutureCancelledError:
                self._count("failovers")
                log.warning("replica %d went down during a call; sending it to another", i)
                continue
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self._set_up(i, False, e.details() or code.name)
                    self._count("failovers")
                    continue
                return None, code, e.details() or code.name, wire.trailing(e), i
            with self.lock:
                self.stats["forwarded"][i] += 1
            return reply, grpc.StatusCode.OK, "", wire.trailing(call), i

    def refused(self, method: str, context):
        """A call whose bytes are not the method's message (answered INVALID_ARGUMENT): counted too."""
        meta = wire.metadata(context)
        if wire.PROBE in meta:
            return
        rid = wire.request_id(meta.get(wire.REQUEST_ID))
        context.set_trailing_metadata([(wire.REQUEST_ID, rid)])
        with self.lock:
            self.stats["requests"] += 1
            self.stats["in_flight"] += 1
        self._record(TASKS.get(method, method), self.grpc.StatusCode.INVALID_ARGUMENT, 0.0, {}, None, rid, None)

    def _record(self, task, code, seconds, trail, replica, rid, request):
        name = code.name if hasattr(code, "name") else str(code)
        images = _number(trail.get(wire.IMAGES), int) if name == "OK" else 0
        queue_ms, engine_ms = _number(trail.get(wire.QUEUE_MS), float), _number(trail.get(wire.ENGINE_MS), float)
        with self.lock:
            s = self.stats
            s["in_flight"] -= 1
            per_task = s["codes"].setdefault(task, {})
            per_task[name] = per_task.get(name, 0) + 1
            if name == "OK":
                s["ok"] += 1
                s["images"] += images or 0
                if queue_ms is not None and engine_ms is not None:
                    hist_observe(s["latency"]["queue"], queue_ms / 1000)
                    hist_observe(s["latency"]["engine"], engine_ms / 1000)
            else:
                s["errors"][name] = s["errors"].get(name, 0) + 1
            hist_observe(s["latency"]["total"], seconds)
        kw = _kwargs(request)
        h, w = kw.get("height"), kw.get("width")
        logs.access(request_id=rid, task=task, prompts=len(getattr(request, "prompt", ()) or ()),
                    size=logs.size(w, h), steps=kw.get("num_inference_steps", "default"), images=images or 0,
                    status=name, replica=replica if replica is not None else "-",
                    queue_ms=queue_ms if queue_ms is not None else "-",
                    engine_ms=engine_ms if engine_ms is not None else "-", total_ms=seconds * 1000)

    def terminate(self, context) -> bool:
        """MII's Terminate, with the stop key: mark stopping (the supervisor then restarts nothing), tell
        the replicas. Without the key: PERMISSION_DENIED, nothing changes."""
        from google.protobuf import empty_pb2
        if not control.may_control(wire.metadata(context), self.stop_key):
            log.warning("refused a Terminate without the deployment's stop key from %s", context.peer())
            context.abort(self.grpc.StatusCode.PERMISSION_DENIED,
                          "Terminate needs the deployment's stop key: use `fastsd stop NAME`")
        (self.ddir / "stopping").write_text("terminate\n")
        for i, stubs in enumerate(self.stubs):
            if self.up[i]:
                try:
                    stubs[proto.TERMINATE](empty_pb2.Empty(), timeout=5, metadata=[(wire.STOP_KEY, self.stop_key)])
                except self.grpc.RpcError as e:
                    log.warning("replica %d did not take Terminate: %s", i, e.code())
        self._stop.set()
        return empty_pb2.Empty()

    def _count(self, key):
        with self.lock:
            self.stats[key] += 1

    def snapshot(self) -> dict:
        with self.lock:
            out = {**json.loads(json.dumps(self.stats)), "up": list(self.up),
                   "health": json.loads(json.dumps(self.health))}  # a deep copy
        return {**out, "admission": self.admission.snapshot()}


def _number(text, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def _kwargs(request) -> dict:
    """The request's query keywords for the access log; never raises (the request may be anything)."""
    out = {}
    try:
        for k, val in request.query_kwargs.items():
            which = val.WhichOneof("oneof_values")
            if which and k in ("height", "width", "num_inference_steps"):
                out[k] = getattr(val, which) if which != "svalue" else repr(getattr(val, which)[:20])
    except Exception:  # noqa: BLE001 - logging must not fail a request
        pass
    return out


def make_handlers(balancer: HealthAwareBalancer, stop: threading.Event):
    """MII's service: Terminate (with the stop key) and every other method forwarded to a replica;
    bytes that are not the method's message get INVALID_ARGUMENT (gRPC would say INTERNAL)."""
    def factory(method, request_cls, reply_cls):
        if method == proto.TERMINATE:
            def handle(request, context):
                reply = balancer.terminate(context)
                stop.set()
                return reply
        else:
            def handle(request, context):
                return balancer.forward(method, request, context)
        return wire.guarded(handle, request_cls.FromString, reply_cls.SerializeToString,
                            on_refused=lambda context: balancer.refused(method, context))
    return proto.handlers(factory)


def listen(server, spec: DeploymentSpec) -> None:
    """The --host listener (TLS with --tls-cert) and, for MII's client, plain gRPC on loopback."""
    hosts = [(spec.host, spec.tls_cert is not None and spec.host not in LOOPBACK)]
    if spec.host not in ("0.0.0.0", "::", *LOOPBACK):
        hosts.append(("127.0.0.1", False))  # MII's client always dials localhost
    elif spec.host in ("0.0.0.0", "::") and spec.tls_cert:
        raise SystemExit("--tls-cert with --host 0.0.0.0 would put loopback on TLS too, where MII's client dials "
                         "plain gRPC: give --host this machine's address")
    for h, tls in hosts:
        address = grpc_address(h, spec.port)
        try:
            ok = server.add_secure_port(address, control.server_credentials(spec.tls_cert, spec.tls_key)) if tls \
                else server.add_insecure_port(address)
        except RuntimeError:
            ok = 0
        if not ok:
            raise SystemExit(f"cannot listen on {h}:{spec.port}: the port is in use or the address is not local")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    spec = DeploymentSpec.read(ddir)
    logs.setup("balancer", spec.log_format)

    import grpc
    from concurrent import futures

    balancer = HealthAwareBalancer(spec, ddir, token=os.environ.get(TOKEN_ENV) or None,
                                   stop_key=control.read_stop_key(ddir))
    stop = threading.Event()
    # a worker per call in flight: every admitted call, and room for refusals, health and Terminate
    workers = balancer.admission.limit(len(spec.replicas)) + 32
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         handlers=[make_handlers(balancer, stop)],
                         options=[*proto.MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)])
    listen(server, spec)
    graceful_signals(stop.set)
    watch_parent(stop.set)
    server.start()
    log.info("load balancer on %s:%d over %d replica(s), timeout %g s, at most %d calls in flight "
             "(--max-queue %d)", spec.host, spec.port, len(spec.replicas), balancer.timeout,
             balancer.admission.limit(len(spec.replicas)), spec.queue_limit)
    stats_path, last = ddir / "balancer.json", None
    started = time.time()
    while True:
        stopped = stop.wait(0.5)
        snap = balancer.snapshot()
        if snap != last or stopped:
            write_json(stats_path, {"pid": os.getpid(), "started_at": started, **snap,
                                    "updated_at": time.time()})
            last = snap
        if stopped:
            break
    log.info("stopping")
    balancer._stop.set()
    server.stop(2).wait(5)
    logging.shutdown()
    os._exit(0)  # gRPC worker threads would otherwise hold the exit up


if __name__ == "__main__":
    sys.exit(main())
