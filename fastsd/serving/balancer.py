"""The deployment's front door: MII's load-balancer service, made health-aware.

    python -m fastsd.serving.balancer DEPLOYMENT_DIR

MII's load balancer is a gRPC server whose servicer (`ServiceBase`) does nothing but Terminate and
whose interceptor (`LoadBalancingInterceptor`) sends call k to replica k mod N, whatever state that
replica is in: a dead replica keeps getting its share and every such call fails with UNAVAILABLE.
This process serves the same service on the same port (MII's `ServiceBase`, MII's proto, clients see
no difference) with an interceptor of our own in place of MII's round-robin:
- it sends a call to the next replica that is up (round-robin over the healthy ones);
- a call that fails with UNAVAILABLE (connection refused or reset: the replica died or is
  restarting) is sent again to another replica, so no request is lost to a dead replica, including
  one in flight when it died (generation with a seed is idempotent); with no replica up, calls wait
  for one until their deadline;
- a probe thread connects to every replica's port four times a second: a replica that stops
  answering is taken out, one that answers again (restarted by the supervisor) is put back;
- a call in flight on a replica that the probe marks down (its host or network went away, which no
  connection error reports) is cancelled and sent to another replica;
- any other status (INVALID_ARGUMENT with the reason, DEADLINE_EXCEEDED, ...) reaches the client
  as the replica sent it (MII's interceptor would turn it into UNKNOWN);
- each call gets a request id (the caller's `x-request-id` metadata, else a new one), passed to the
  replica and sent back in the trailing metadata, and one access-log line; its status, latency
  (end to end, and the replica's queue wait and engine time) and images go into balancer.json,
  which `fastsd status` and the Prometheus exporter (metrics.py) read; the deployment's own probes
  (`fastsd-probe` metadata) are answered but not counted;
- every call has a deadline: the client's, capped by the deployment's per-request timeout;
- Terminate (what `mii.legacy.terminate(NAME)` sends) marks the deployment as stopping, so the
  supervisor restarts nothing and takes every process down, then forwards Terminate to each replica
  that is up, then stops this server.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from . import logs, wire
from .folders import read_json, write_json
from .histograms import LATENCY_BOUNDS, hist_new, hist_observe
from .ports import connect_host, grpc_address, port_answers
from .processes import graceful_signals, watch_parent
from .records import IMAGE_TASK, TEXT_TO_IMAGE
from .spec import DeploymentSpec, ReplicaPlacement

log = logging.getLogger("fastsd.serving.balancer")
TASKS = {"Txt2ImgReply": TEXT_TO_IMAGE, "InpaintingReply": IMAGE_TASK}  # MII's method -> task
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]


class HealthAwareBalancer:
    def __init__(self, replicas: list[ReplicaPlacement], timeout: float, ddir: Path):
        import grpc
        from mii.legacy.grpc_related.modelresponse_server import AtomicCounter

        self.grpc = grpc
        self.targets = [(connect_host(r.host), r.port) for r in replicas]
        self.timeout = timeout
        self.ddir = ddir
        self.counter = AtomicCounter()  # MII's
        self.lock = threading.Lock()
        self.stubs = [self._stub(i) for i in range(len(self.targets))]
        self.up = [port_answers(p, h, 0.3) for h, p in self.targets]
        self.stats = {"requests": 0, "ok": 0, "failovers": 0, "waited_for_replica": 0, "in_flight": 0, "images": 0,
                      "errors": {}, "codes": {}, "forwarded": [0] * len(self.targets),
                      "marked_down": [0] * len(self.targets),
                      "latency": {k: hist_new(LATENCY_BOUNDS) for k in ("queue", "engine", "total")}}
        previous = read_json(ddir / "balancer.json") or {}  # counters run on across restarts, as a replica's do
        for k, v in previous.items():
            if k in self.stats and k != "in_flight" and type(v) is type(self.stats[k]) \
                    and (not isinstance(v, list) or len(v) == len(self.targets)):
                self.stats[k] = v
        self._stop = threading.Event()
        threading.Thread(target=self._probe, name="probe", daemon=True).start()

    # -- replicas ------------------------------------------------------------------------------
    def _stub(self, i):
        from mii.legacy.constants import GRPC_MAX_MSG_SIZE
        from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc
        host, port = self.targets[i]
        channel = self.grpc.insecure_channel(grpc_address(host, port), options=[
            ("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
            ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE), *CHANNEL_OPTIONS])
        return pb2_grpc.ModelResponseStub(channel)

    def _set_up(self, i: int, up: bool, why: str = ""):
        with self.lock:
            if self.up[i] == up:
                return
            self.up[i] = up
            if up:
                self.stubs[i] = self._stub(i)  # a fresh channel: no reconnect backoff left over
            else:
                self.stats["marked_down"][i] += 1
        log.warning("replica %d (%s:%d) is %s%s", i, *self.targets[i], "up" if up else "DOWN",
                    f": {why}" if why else "")

    def _probe(self):
        while not self._stop.wait(0.25):
            for i, (host, port) in enumerate(self.targets):
                answers = port_answers(port, host, 0.5)
                if answers != self.up[i]:
                    self._set_up(i, answers, "" if answers else "its port does not answer")

    def _pick(self, avoid: set[int]):
        with self.lock:
            healthy = [i for i, u in enumerate(self.up) if u]
        if not healthy:
            return None
        preferred = [i for i in healthy if i not in avoid] or healthy
        return preferred[self.counter.get_and_increment() % len(preferred)]

    # -- calls ---------------------------------------------------------------------------------
    def forward(self, method: str, request, context):
        grpc = self.grpc
        meta = wire.metadata(context)
        probe = wire.PROBE in meta  # the deployment's own readiness check: answered, never counted
        rid = wire.request_id(meta.get(wire.REQUEST_ID))
        out_meta = [(wire.REQUEST_ID, rid)] + ([(wire.PROBE, "1")] if probe else [])
        task = TASKS.get(method, method)
        t_start = time.monotonic()
        remaining = context.time_remaining()
        deadline = t_start + min(self.timeout, remaining if remaining is not None else self.timeout)
        if not probe:
            with self.lock:
                self.stats["requests"] += 1
                self.stats["in_flight"] += 1
        code, trail, replica = grpc.StatusCode.UNKNOWN, {}, None  # what is counted if routing itself fails
        try:
            reply, code, detail, trail, replica = self._route(method, request, deadline, out_meta)
            context.set_trailing_metadata([(wire.REQUEST_ID, rid), *[(k, v) for k, v in trail.items()
                                                                     if k.startswith("fastsd-")]])
            if code != grpc.StatusCode.OK:
                context.abort(code, detail)
            return reply
        finally:
            if not probe:
                self._record(task, code, time.monotonic() - t_start, trail, replica, rid, request)

    def _route(self, method, request, deadline, out_meta):
        """-> (reply, code, details, the replica's trailing metadata, replica index)."""
        grpc = self.grpc
        tried: set[int] = set()
        waited = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, grpc.StatusCode.DEADLINE_EXCEEDED, (
                    f"no reply within the deployment's timeout ({self.timeout:g} s)" if tried or not waited
                    else "no replica of the deployment came up before the request's deadline"), {}, None
            i = self._pick(tried)
            if i is None:  # every replica is down or restarting: wait for one
                if not waited:
                    waited = True
                    self._count("waited_for_replica")
                time.sleep(min(0.1, max(0.0, left)))
                continue
            tried.add(i)
            call = getattr(self.stubs[i], method).future(request, timeout=left, metadata=out_meta)
            while not call.done():
                if not self.up[i]:  # the probe lost the replica (its host or network went away)
                    call.cancel()
                    break
                try:
                    call.result(timeout=0.1)
                except (grpc.FutureTimeoutError, grpc.FutureCancelledError, grpc.RpcError):
                    pass  # the outcome is read below
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

    def terminate(self):
        """MII's Terminate: mark stopping (the supervisor then restarts nothing), tell the replicas."""
        from google.protobuf import empty_pb2
        (self.ddir / "stopping").write_text("terminate\n")
        for i, stub in enumerate(self.stubs):
            if self.up[i]:
                try:
                    stub.Terminate(empty_pb2.Empty(), timeout=5)
                except self.grpc.RpcError as e:
                    log.warning("replica %d did not take Terminate: %s", i, e.code())
        self._stop.set()

    def _count(self, key):
        with self.lock:
            self.stats[key] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {**json.loads(json.dumps(self.stats)), "up": list(self.up)}  # a deep copy


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


def make_interceptor(balancer: HealthAwareBalancer):
    import grpc
    from mii.legacy.constants import TERMINATE_METHOD

    class Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            next_handler = continuation(handler_call_details)
            method = handler_call_details.method.split("/")[-1]
            if next_handler is None or next_handler.unary_unary is None:
                return next_handler

            if method == TERMINATE_METHOD:
                def handle(request, context):
                    balancer.terminate()
                    return next_handler.unary_unary(request, context)  # MII's ServiceBase: stops the server
            else:
                def handle(request, context):
                    return balancer.forward(method, request, context)

            # bytes that are not the method's message: INVALID_ARGUMENT (gRPC would say INTERNAL)
            return wire.guarded(handle, next_handler.request_deserializer, next_handler.response_serializer,
                                on_refused=lambda context: balancer.refused(method, context))

    return Interceptor()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    spec = DeploymentSpec.read(ddir)
    logs.setup("balancer", spec.log_format)

    import grpc
    from concurrent import futures

    from mii.legacy.constants import GRPC_MAX_MSG_SIZE, LB_MAX_WORKER_THREADS
    from mii.legacy.grpc_related.modelresponse_server import ServiceBase
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc

    balancer = HealthAwareBalancer(spec.replicas, spec.limits.timeout, ddir)
    service = ServiceBase()  # MII's: Terminate sets its stop event
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(LB_MAX_WORKER_THREADS, 8 * len(spec.replicas))),
        interceptors=[make_interceptor(balancer)],
        options=[("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
                 ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE), ("grpc.so_reuseport", 0)])
    pb2_grpc.add_ModelResponseServicer_to_server(service, server)
    hosts = [spec.host]
    if spec.host not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        hosts.append("127.0.0.1")  # MII's client always dials localhost
    for h in hosts:
        try:
            ok = server.add_insecure_port(grpc_address(h, spec.port))
        except RuntimeError:
            ok = 0
        if not ok:
            raise SystemExit(f"cannot listen on {h}:{spec.port}: the port is in use or the address is not local")
    stop = service.get_stop_event()
    graceful_signals(stop.set)
    watch_parent(stop.set)
    server.start()
    log.info("load balancer on %s:%d over %d replica(s), timeout %g s", spec.host, spec.port,
             len(spec.replicas), balancer.timeout)
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
