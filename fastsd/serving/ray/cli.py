"""`fastsd serve --ray [--ray-address ADDR]`: fastsd's Ray Serve application from the command line.

Without --ray-address it starts a one-machine Ray cluster in this process and serves until Ctrl-C or
SIGTERM (then the application and the cluster stop). With --ray-address (a running cluster's GCS address,
`ray start --head` prints it) it joins that cluster, deploys the application and returns: the application
lives in the cluster until `serve delete NAME` (or `serve shutdown`), as any Serve application does.
The HTTP port is Serve's proxy (--rest-port, default 8000 on --host); each option is checked before Ray starts.
"""
from __future__ import annotations

import os
import signal
import threading

from ...errors import InvalidParameter
from ..processes import TOKEN_ENV

DEFAULT_HTTP_PORT = 8000
# `fastsd serve` options the Ray runtime does not take (each is about MII's processes, ports or files)
NOT_ON_RAY = ("hostfile", "ssh_config", "gpus", "ui_port", "metrics_port", "tls_cert", "tls_key", "lora",
              "image_url_allow", "vae_tiny", "config", "backend", "attention", "int8", "cache_interval", "compile",
              "fused_ops", "cuda_graphs")


# build_app's argument -> the option of `fastsd serve` that gave it
FLAGS = {"num_replicas": "--replicas", "max_queued_requests": "--max-queue", "batch_wait_ms": "--batch-window-ms",
         "max_batch": "--max-batch", "num_cpus": "--num-cpus", "num_gpus": "--num-gpus", "name": "--deployment",
         "lora_dir": "--lora-dir", "max_body_bytes": "--max-body-bytes", "timeout": "--timeout",
         "threads": "--threads", "model": "--model", "device": "--device", "profile": "--profile", "dtype": "--dtype"}


def app_args(args) -> dict:
    """`fastsd serve --ray`'s options -> build_app's args (checked there)."""
    for name in NOT_ON_RAY:
        if getattr(args, name, None):
            flag = "--" + name.replace("_", "-")
            raise InvalidParameter(flag, getattr(args, name), "nothing with --ray (see docs/ray.md for what the "
                                                               "Ray runtime takes)")
    if args.ray_address is not None and not args.ray:
        raise InvalidParameter("--ray-address", args.ray_address, "only with --ray")
    out = {"model": args.model, "name": args.deployment, "profile": args.profile or "exact",
           "device": args.device, "num_replicas": args.replicas, "timeout": args.timeout,
           "max_body_bytes": args.max_body_bytes, "batch_wait_ms": args.batch_window_ms,
           "random_weights": bool(args.random_weights), "lora_dir": args.lora_dir, "dtype": args.dtype,
           "threads": args.threads, "max_queued_requests": args.max_queue,
           "token": args.token or os.environ.get(TOKEN_ENV) or None}
    if args.max_batch != "auto":
        out["max_batch"] = args.max_batch
    if args.num_cpus is not None:
        out["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        out["num_gpus"] = args.num_gpus
    return out


def serve_on_ray(args) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from .app import build_app  # lazy: ray, only with --ray
    try:
        app = build_app(app_args(args))  # every value checked before a cluster starts
    except InvalidParameter as e:
        raise InvalidParameter(FLAGS.get(e.name, e.name), e.value, e.allowed) from None
    import ray
    from ray import serve
    port = args.rest_port or DEFAULT_HTTP_PORT
    ray.init(address=args.ray_address, include_dashboard=False if args.ray_address is None else None,
             log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which replaces SIGTERM's handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(app, name=args.deployment, route_prefix="/", blocking=False)
        print(f"Ray Serve application '{args.deployment}' is up: {args.model}, {args.replicas} engine replica(s); "
              f"REST http://{args.host}:{port}/score (OpenAI /v1, A1111 /sdapi/v1, /health, /ready, /metrics)",
              flush=True)
        if args.ray_address is not None:
            print(f"it runs in the cluster at {args.ray_address}; stop it with: serve delete {args.deployment} "
                  f"--address http://<head>:8265, or serve shutdown", flush=True)
            return 0
        print("serving until Ctrl-C", flush=True)
        stop.wait()
        print("stopping", flush=True)
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()
