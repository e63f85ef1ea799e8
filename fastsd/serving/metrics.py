"""Prometheus metrics of a deployment, with prometheus_client.

    python -m fastsd.serving.metrics DEPLOYMENT_DIR     (started by the supervisor for --metrics-port)

The REST gateway serves `GET /metrics` on its own port; `--metrics-port` serves the same on a port of
its own (for a deployment without REST). Both read the deployment's figures from the same files
`fastsd status` reads (balancer.json, replica-I.json, state.json; see folders.py), through
`status.status`, so the metrics and `fastsd status --json` agree by construction. Names:

    fastsd_requests_total{task,outcome,code}      requests answered by the load balancer (gRPC status code)
    fastsd_request_duration_seconds               end to end, at the load balancer (histogram)
    fastsd_queue_wait_seconds                     from arrival at a replica to its engine call (histogram)
    fastsd_engine_seconds                         the engine call a request shared (histogram)
    fastsd_in_flight_requests                     requests the load balancer is answering now
    fastsd_failovers_total                        calls sent again to another replica
    fastsd_shed_total                             calls refused at once (at capacity, or no replica up)
    fastsd_cancelled_total                        calls whose caller went away before the answer
    fastsd_images_generated_total{replica}        images made by each replica
    fastsd_engine_calls_total{replica}            engine calls (batches) of each replica
    fastsd_merged_batches_total{replica}          engine calls that served more than one request
    fastsd_batch_requests, fastsd_batch_images    requests and images per engine call (histograms)
    fastsd_queue_depth{replica}                   requests waiting for an engine call
    fastsd_replica_up{replica,host}               1 when the replica is up and answers the load balancer's health check
    fastsd_replica_restarts_total{replica}        restarts by the supervisor
    fastsd_http_requests_total{path,outcome,code} HTTP requests (REST gateway only), by HTTP status
    fastsd_http_request_duration_seconds{path}    HTTP requests, end to end (histogram)
    fastsd_http_in_flight_requests                HTTP requests being answered now

Probes (`fastsd serve`'s readiness ping, /health, /ready, /metrics) are not in fastsd_requests_total.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import logs
from .folders import use_cache_path
from .processes import graceful_signals, watch_parent
from .spec import DeploymentSpec
from .status import status

OUTCOMES = {"OK": "ok", "INVALID_ARGUMENT": "bad_request", "UNIMPLEMENTED": "bad_request",
            "DEADLINE_EXCEEDED": "timeout", "UNAVAILABLE": "unavailable", "RESOURCE_EXHAUSTED": "busy",
            "CANCELLED": "cancelled"}


def outcome(code: str) -> str:
    return OUTCOMES.get(code, "error")


def http_outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return {401: "unauthorized", 429: "busy", 503: "unavailable", 504: "timeout"}.get(
        status, "bad_request" if status < 500 else "error")


def _histogram(name: str, doc: str, h: dict | None):
    """A histogram kept in a stats file (histograms.hist_new) as prometheus_client's family."""
    from prometheus_client.core import HistogramMetricFamily
    fam = HistogramMetricFamily(name, doc)
    if h and h.get("counts"):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(float, h["bounds"]), float("inf")], h["counts"]):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        fam.add_metric([], buckets, h.get("sum", 0.0))
    return fam


def _merge(hists: list) -> dict | None:
    hists = [h for h in hists if h and h.get("counts")]
    if not hists:
        return None
    out = {"bounds": hists[0]["bounds"], "counts": [0] * len(hists[0]["counts"]), "sum": 0.0, "count": 0}
    for h in hists:
        if h["bounds"] == out["bounds"]:
            out["counts"] = [a + b for a, b in zip(out["counts"], h["counts"])]
            out["sum"] += h["sum"]
            out["count"] += h["count"]
    return out


class DeploymentCollector:
    """A prometheus_client collector: each scrape reads the deployment's state as `fastsd status` does."""

    def __init__(self, name: str):
        self.name = name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = status(self.name)
        b = s["balancer"]
        req = CounterMetricFamily("fastsd_requests", "Requests answered by the load balancer, by task, outcome "
                                  "and gRPC status code", labels=["task", "outcome", "code"])
        for task, codes in (b.get("codes") or {}).items():
            for code, n in codes.items():
                req.add_metric([task, outcome(code), code], n)
        yield req
        lat = b.get("latency") or {}
        yield _histogram("fastsd_request_duration_seconds", "Requests end to end at the load balancer",
                         lat.get("total"))
        yield _histogram("fastsd_queue_wait_seconds", "Wait from arrival at a replica to the engine call",
                         lat.get("queue"))
        yield _histogram("fastsd_engine_seconds", "The engine call each request shared", lat.get("engine"))
        yield GaugeMetricFamily("fastsd_in_flight_requests", "Requests the load balancer is answering now",
                                value=b.get("in_flight") or 0)
        yield CounterMetricFamily("fastsd_failovers", "Calls sent again to another replica",
                                  value=b.get("failovers") or 0)
        yield CounterMetricFamily("fastsd_shed", "Calls refused at once: at capacity (--max-queue) or no replica up",
                                  value=b.get("shed") or 0)
        yield CounterMetricFamily("fastsd_cancelled", "Calls whose caller went away before the answer",
                                  value=b.get("cancelled") or 0)
        labelled = {
            "images": CounterMetricFamily("fastsd_images_generated", "Images made", labels=["replica"]),
            "batches": CounterMetricFamily("fastsd_engine_calls", "Engine calls (batches)", labels=["replica"]),
            "merged_batches": CounterMetricFamily("fastsd_merged_batches", "Engine calls serving several requests",
                                                  labels=["replica"]),
            "queue_depth": GaugeMetricFamily("fastsd_queue_depth", "Requests waiting for an engine call",
                                             labels=["replica"]),
        }
        up = GaugeMetricFamily("fastsd_replica_up", "1 when the replica is up and reachable", labels=["replica", "host"])
        restarts = CounterMetricFamily("fastsd_replica_restarts", "Restarts by the supervisor", labels=["replica"])
        for r in s["replicas"]:
            i = str(r["index"])
            for key, fam in labelled.items():
                fam.add_metric([i], r.get(key) or 0)
            up.add_metric([i, str(r["host"])], 1 if r["state"] == "up" else 0)
            restarts.add_metric([i], r.get("restarts") or 0)
        yield from labelled.values()
        yield up
        yield restarts
        yield _histogram("fastsd_batch_requests", "Requests per engine call",
                         _merge([r.get("batch_requests_hist") for r in s["replicas"]]))
        yield _histogram("fastsd_batch_images", "Images per engine call",
                         _merge([r.get("batch_images_hist") for r in s["replicas"]]))


def registry_for(name: str):
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DeploymentCollector(name))
    return reg


def main(argv=None) -> int:
    import threading

    from prometheus_client import start_http_server

    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    spec = DeploymentSpec.read(ddir)
    logs.setup("metrics", spec.log_format)
    use_cache_path()
    server, thread = start_http_server(spec.metrics_port, addr=spec.host, registry=registry_for(spec.name))
    stop = threading.Event()
    graceful_signals(stop.set)
    watch_parent(stop.set)
    import logging
    logging.getLogger("fastsd.serving.metrics").info("metrics on http://%s:%d/metrics", spec.host,
                                                     spec.metrics_port)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
