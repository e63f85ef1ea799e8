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
- any other status (INVALID_ARGUMENT with the reason, DEADLINE_EXCEEDED, ...) reaches the client
  as the replica sent it (MII's interceptor would turn it into UNKNOWN);
- every call has a deadline: the client's, capped by the deployment's per-request timeout;
- Terminate (what `mii.legacy.terminate(NAME)` sends) marks the deployment as stopping, so the
  supervisor restarts nothing and takes every process down, then forwards Terminate to each replica
  that is up, then stops this server.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from .common import connect_host, graceful_signals, port_answers, read_json, watch_parent, write_json

log = logging.getLogger("fastsd.serving.balancer")
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]


class HealthAwareBalancer:
    def __init__(self, replicas: list[dict], timeout: float, ddir: Path):
        import grpc
        from mii.legacy.grpc_related.modelresponse_server import AtomicCounter

        self.grpc = grpc
        self.targets = [(connect_host(r["host"]), int(r["port"])) for r in replicas]
        self.timeout = timeout
        self.ddir = ddir
        self.counter = AtomicCounter()  # MII's
        self.lock = threading.Lock()
        self.stubs = [self._stub(i) for i in range(len(self.targets))]
        self.up = [port_answers(p, h, 0.3) for h, p in self.targets]
        self.stats = {"requests": 0, "ok": 0, "failovers": 0, "waited_for_replica": 0,
                      "errors": {}, "forwarded": [0] * len(self.targets), "marked_down": [0] * len(self.targets)}
        self._stop = threading.Event()
        threading.Thread(target=self._probe, name="probe", daemon=True).start()

    # -- replicas ------------------------------------------------------------------------------
    def _stub(self, i):
        from mii.legacy.constants import GRPC_MAX_MSG_SIZE
        from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc
        from .replica import grpc_address
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
        remaining = context.time_remaining()
        deadline = time.monotonic() + min(self.timeout, remaining if remaining is not None else self.timeout)
        self._count("requests")
        tried: set[int] = set()
        waited = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._error(grpc.StatusCode.DEADLINE_EXCEEDED)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no reply within the deployment's timeout ({self.timeout:g} s)" if tried or not waited
                              else "no replica of the deployment came up before the request's deadline")
            i = self._pick(tried)
            if i is None:  # every replica is down or restarting: wait for one
                if not waited:
                    waited = True
                    self._count("waited_for_replica")
                time.sleep(min(0.1, max(0.0, left)))
                continue
            tried.add(i)
            try:
                reply = getattr(self.stubs[i], method)(request, timeout=left)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._set_up(i, False, e.details() or "unavailable")
                    self._count("failovers")
                    continue
                self._error(code)
                context.abort(code, e.details() or code.name)
            with self.lock:
                self.stats["forwarded"][i] += 1
                self.stats["ok"] += 1
            return reply

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

    def _error(self, code):
        with self.lock:
            self.stats["errors"][code.name] = self.stats["errors"].get(code.name, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            return {**{k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                       for k, v in self.stats.items()}, "up": list(self.up)}


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

            return grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=next_handler.request_deserializer,
                response_serializer=next_handler.response_serializer)

    return Interceptor()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s balancer %(levelname)s %(message)s")
    spec = read_json(ddir / "spec.json")

    import grpc
    from concurrent import futures

    from mii.legacy.constants import GRPC_MAX_MSG_SIZE, LB_MAX_WORKER_THREADS
    from mii.legacy.grpc_related.modelresponse_server import ServiceBase
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc

    from .replica import grpc_address

    balancer = HealthAwareBalancer(spec["replicas"], spec["limits"]["timeout"], ddir)
    service = ServiceBase()  # MII's: Terminate sets its stop event
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(LB_MAX_WORKER_THREADS, 8 * len(spec["replicas"]))),
        interceptors=[make_interceptor(balancer)],
        options=[("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
                 ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE), ("grpc.so_reuseport", 0)])
    pb2_grpc.add_ModelResponseServicer_to_server(service, server)
    hosts = [spec["host"]]
    if spec["host"] not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        hosts.append("127.0.0.1")  # MII's client always dials localhost
    for h in hosts:
        try:
            ok = server.add_insecure_port(grpc_address(h, spec["port"]))
        except RuntimeError:
            ok = 0
        if not ok:
            raise SystemExit(f"cannot listen on {h}:{spec['port']}: the port is in use or the address is not local")
    stop = service.get_stop_event()
    graceful_signals(stop.set)
    watch_parent(stop.set)
    server.start()
    log.info("load balancer on %s:%d over %d replica(s), timeout %g s", spec["host"], spec["port"],
             len(spec["replicas"]), balancer.timeout)
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
