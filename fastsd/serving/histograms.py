"""Histograms in the deployment's JSON stats files: counts per bucket that `fastsd status` and the
metrics exporter (metrics.py, prometheus_client) both read, so the two cannot disagree. Standard
library only: the replicas and the balancer write them without importing prometheus_client."""
from __future__ import annotations

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64)


def hist_new(bounds) -> dict:
    """Upper bounds, then one count per bucket (the last one is +Inf), the sum and the count."""
    return {"bounds": list(bounds), "counts": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0}


def hist_observe(h: dict, value: float) -> None:
    i = next((k for k, b in enumerate(h["bounds"]) if value <= b), len(h["bounds"]))
    h["counts"][i] += 1
    h["sum"] += value
    h["count"] += 1
