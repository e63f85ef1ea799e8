"""The Ray Serve application builder: `build_app(args) -> Application`, two deployments.

    FastSDIngress  the HTTP routes (ingress.py): one replica, num_cpus 0; calls the engines through a
                   DeploymentHandle
    FastSDEngine   the engines (engine.py): num_replicas or autoscaling, ray_actor_options (num_cpus,
                   num_gpus), max_ongoing_requests, max_queued_requests (Serve's load shedding)

`serve run fastsd.serving.ray:build_app model=fastsd-shapes num_replicas=2` and
`serve.run(build_app({"model": "fastsd-shapes"}))` both call it; `serve build fastsd.serving.ray:build_app
-o config.yaml` writes the config an operator deploys with `serve deploy` (or KubeRay's RayService).
The arguments are checked by config.py (InvalidParameter naming the argument) before anything deploys.
"""
from __future__ import annotations

from ray import serve

from .config import ENGINE, INGRESS, RayAppConfig
from .engine import EngineReplica
from .ingress import Ingress


def build_app(args: dict):
    cfg = RayAppConfig.from_args(args)
    spec = cfg.spec()
    scale = {"num_replicas": cfg.num_replicas} if cfg.autoscaling is None else \
        {"num_replicas": "auto", "autoscaling_config": cfg.autoscaling}
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE, **scale, max_ongoing_requests=cfg.ongoing,
        max_queued_requests=-1 if cfg.queued < 0 else cfg.queued,
        ray_actor_options=dict(cfg.actor_options), graceful_shutdown_timeout_s=5)
    top = cfg.num_replicas or cfg.autoscaling["max_replicas"]
    workers = top * cfg.ongoing + max(0, cfg.queued) + 8  # a thread per call in flight or queued
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=workers,
        graceful_shutdown_timeout_s=5)
    return ingress.bind(spec, cfg.token, engine.bind(spec, cfg.max_batch, cfg.batch_wait_ms / 1000.0), workers)
