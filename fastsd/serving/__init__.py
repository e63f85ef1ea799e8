"""Serving the fastsd engine through a persistent DeepSpeed-MII deployment.

`fastsd serve` (deploy.serve) starts a supervisor (supervisor.py) that runs MII's gRPC model servers,
one fastsd engine each behind a dynamic batcher (replica.py, batcher.py), a health-aware load balancer
in place of MII's round-robin (balancer.py) and optionally a REST gateway (rest.py). MII's deployment
record (its score file) makes `mii.legacy.mii_query_handle(NAME)` find it. This package imports MII
only where it is used; folders, ports, processes and spec are standard library only.
"""
from .errors import ServingError
from .folders import cache_path

__all__ = ["ServingError", "cache_path"]
