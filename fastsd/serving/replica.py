"""One replica: a fastsd engine hosted by MII's gRPC model server.

    python -m fastsd.serving.replica DEPLOYMENT_DIR INDEX

started by the supervisor. It serves MII's `ModelResponse` servicer (the class behind MII's
`serve_inference`), with these changes made by subclassing, each for a reason:
- MII runs every pipeline call under one lock; the lock is replaced by a no-op so concurrent
  requests reach the batching pipeline together (batcher.py), which serialises the engine itself;
- each request has a deadline (its gRPC deadline, set by the load balancer: the client's, capped by
  `--timeout`) and is cancelled when its call ends early (the caller went away): the batcher drops it
  while it is queued and stops the engine at the next denoising step once no request of the batch is
  still wanted;
- a bad request becomes INVALID_ARGUMENT with the reason (MII would answer UNKNOWN with
  "Exception calling application"; a broken LoRA file is one, naming the adapter, loras.py), a
  timeout DEADLINE_EXCEEDED, a cancelled call CANCELLED, other failures INTERNAL with a plain message
  (the traceback goes to the log with the request id, never to the caller); the request is unpacked
  by schema.py, not by MII (whose unpacking raises on an empty `Value`), and bytes that are not a
  request message are refused too (wire.py);
- the reply's trailing metadata carries its queue wait, engine time and image count (wire.py);
- it serves the standard gRPC health service (grpc.health.v1), which the load balancer calls to
  tell a live replica from a stalled one; Terminate is obeyed only with the stop key (control.py);
- the server binds the deployment's host (MII binds [::], every interface) and sets
  grpc.so_reuseport=0, so a port already in use is an error instead of being silently shared.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from .. import images as imgs
from ..errors import InvalidParameter
from ..kernels import available_memory_bytes
from ..backends import load_for_backend
from ..optimize import OptimizeConfig, optimize
from . import control, logs, proto, schema, wire
from .batch_size import BatchSizer, engine_need, engine_run, probe_size, probe_task, release_free_memory, resident_bytes
from .batcher import BatchingPipeline, RequestCancelled, RequestTimeout
from .folders import read_json, write_json
from .loras import LoraCatalog
from .ports import grpc_address
from .progress import Interrupted, ReplicaProgress
from .processes import graceful_signals, watch_parent
from .request import Request
from .spec import DeploymentSpec, ReplicaPlacement

log = logging.getLogger("fastsd.serving.replica")
HEADROOM = 0.9  # of the memory a replica may plan for (kernels.plan_memory's default)


def decode_images(limits, image: list[bytes], mask_image: list[bytes]) -> tuple[list, list]:
    """A request's encoded images and masks -> PIL images, under the deployment's limits (bytes in all, each
    image's bytes and pixels, read from the header before decoding)."""
    total = sum(len(b) for b in image) + sum(len(b) for b in mask_image)
    if total > limits.max_image_bytes:
        raise InvalidParameter("image", f"{total} bytes of images", f"at most {limits.max_image_bytes} "
                               "bytes of images and masks in one request")
    lim = {"max_bytes": limits.max_image_bytes, "max_pixels": limits.max_pixels}
    return ([imgs.decode(b, "image", **lim) for b in image],
            [imgs.decode(b, "mask_image", mode="L", **lim) for b in mask_image])


def make_servicer(pipeline):
    import grpc
    from mii.legacy.constants import TaskType
    from mii.legacy.grpc_related.modelresponse_server import ModelResponse
    from mii.legacy.method_table import GRPC_METHOD_TABLE

    class FastSDModelResponse(ModelResponse):
        def __init__(self, inference_pipeline):
            super().__init__(inference_pipeline)
            self.lock = contextlib.nullcontext()  # the batcher serialises the engine; see module doc
            self.task_methods = GRPC_METHOD_TABLE[TaskType.TEXT2IMG]

        def _answer(self, context, reply):
            """Every RPC maps errors to a gRPC status the same way: the caller gets a plain reason, the
            server goes on."""
            try:
                return reply()
            except InvalidParameter as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except RequestTimeout as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            except RequestCancelled as e:
                context.abort(grpc.StatusCode.CANCELLED, str(e))
            except Interrupted as e:
                context.abort(grpc.StatusCode.ABORTED, str(e))  # not CANCELLED: the balancer fails that over
            except Exception:  # noqa: BLE001 - the log gets the traceback, the caller a plain reason
                rid = wire.metadata(context).get(wire.REQUEST_ID, "-")
                log.exception("request %s failed", rid)
                context.abort(grpc.StatusCode.INTERNAL, "the replica failed to answer this request; "
                                                        f"its log has the details (request id {rid})")

        def _deadline(self, context):
            """The call's deadline on this process's monotonic clock, and an event set when the call
            ends (finished, cancelled by its caller, or past its deadline)."""
            ended = threading.Event()
            context.add_callback(ended.set)
            left = context.time_remaining()
            return (time.monotonic() + left if left is not None else None), ended

        def Txt2ImgReply(self, request, context):
            return self._answer(context, lambda: self._txt2img(request, context))

        def InpaintingReply(self, request, context):
            """MII's inpainting RPC; without masks it is image-to-image. The images are decoded here under the
            deployment's limits (MII's own unpacking would open any size, decompression bombs included)."""
            return self._answer(context, lambda: self._inpaint(request, context))

        def _txt2img(self, request, context):
            meta = wire.metadata(context)
            # unpacked here, not by MII: every field is checked (schema.py) before anything runs
            kwargs = schema.unpack_query_kwargs(request.query_kwargs)
            t0 = time.time()
            deadline, ended = self._deadline(context)
            reply = self.inference_pipeline.handle(list(request.prompt), list(request.negative_prompt), kwargs,
                                                   probe=wire.PROBE in meta, deadline=deadline, cancelled=ended)
            context.set_trailing_metadata([(wire.QUEUE_MS, f"{reply.queue_seconds * 1000:.3f}"),
                                           (wire.ENGINE_MS, f"{reply.engine_seconds * 1000:.3f}"),
                                           (wire.IMAGES, str(len(reply.images)))])
            return self.task_methods.pack_response_to_proto(reply, time.time() - t0, -1)

        def _inpaint(self, request, context):
            image, mask = decode_images(self.inference_pipeline.limits, request.image, request.mask_image)
            kwargs = schema.unpack_query_kwargs(request.query_kwargs)
            start = time.time()
            deadline, ended = self._deadline(context)
            reply = self.inference_pipeline.handle(list(request.prompt), list(request.negative_prompt), kwargs,
                                                   image=image, mask_image=mask, deadline=deadline, cancelled=ended)
            return GRPC_METHOD_TABLE[TaskType.INPAINTING].pack_response_to_proto(reply, time.time() - start, -1)

        def _unsupported(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "this deployment serves text-to-image and inpainting/image-to-image only "
                          "(Txt2ImgReply, InpaintingReply)")

        GeneratorReply = ClassificationReply = QuestionAndAnswerReply = FillMaskReply = _unsupported
        TokenClassificationReply = ZeroShotImgClassificationReply = _unsupported
        CreateSession = DestroySession = _unsupported

    return FastSDModelResponse(pipeline)


def make_server(servicer, host: str, port: int, workers: int | None = None, stop_key: str | None = None,
                health=None):
    """A gRPC server for MII's ModelResponse service on host:port, refusing a port in use; with `health`
    (grpc_health's HealthServicer) the standard health service too."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc
    from mii.legacy.constants import LB_MAX_WORKER_THREADS
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers or LB_MAX_WORKER_THREADS),
        interceptors=[wire.guard_interceptor(lambda meta: control.may_control(meta, stop_key))],
        options=[*proto.MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)])
    pb2_grpc.add_ModelResponseServicer_to_server(servicer, server)
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(grpc_address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise SystemExit(f"cannot listen on {host}:{port}: the port is in use or the address is not local")
    return server


def build_engine(spec: DeploymentSpec, replica: ReplicaPlacement | None = None):
    """The engine a replica of `spec` serves (on the GPU its placement names, if any)."""
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    eng = dict(spec.engine)
    if replica is not None and replica.cuda_visible_devices is not None:
        eng["device"] = "cuda"
    if spec.lora_dir:
        eng["lora_switching"] = True  # --compile keeps the weights writable for switches (optimize.py)
    model = load_for_backend(eng.get("backend", "torch"), spec.model, random_weights=spec.random_weights,
                             allow_pickle=spec.allow_pickle, config=spec.config,
                             safety_checker=eng.get("safety_checker", True), vae_tiny=spec.vae_tiny)
    return optimize(model, OptimizeConfig(**eng).validated())


def build_sizer(spec: DeploymentSpec, replica: ReplicaPlacement, engine,
                host_free_at_start: tuple[int, str] | None = None):
    """The replica's BatchSizer: the deployment's --max-batch (a number, or auto with its limit and
    gain), capped by this replica's share of memory: on the CPU the host's available memory (measured
    by `fastsd serve` before any replica loaded) over the replicas on the host, less what this replica
    holds now; on a GPU the free memory now over the replicas on that GPU."""
    device = str(getattr(engine.backend, "device", "cpu"))
    sharing = max(1, replica.host_replicas or 1)
    if device.startswith("cuda"):
        free, source = available_memory_bytes(device)
        sharing = max(1, sum(1 for r in spec.replicas if r.host == replica.host
                             and r.cuda_visible_devices == replica.cuda_visible_devices))
        budget, base = int(free * HEADROOM) // sharing, 0
        source = f"{HEADROOM:.0%} of {source} over {sharing} replica(s) on the GPU"
    else:
        host = replica.host_memory_bytes
        if host:
            source = f"{HEADROOM:.0%} of the host's available memory at `fastsd serve`"
        else:  # a replica on another host measured its own, before loading
            host, source = host_free_at_start or available_memory_bytes("cpu")
            source = f"{HEADROOM:.0%} of {source} at replica start"
        budget, base = int(host * HEADROOM) // sharing, resident_bytes()
        source += f", over {sharing} replica(s) on the host"
    return BatchSizer(spec.max_batch, limit=spec.max_batch_limit, min_gain=spec.batch_min_gain,
                      need=engine_need(engine, base),
                      budget_bytes=budget, budget_source=source)


def measure_native(sizer, engine, steps: int) -> None:
    """The start-up warm-up: the batch size for the model's native size, guided, at `steps` steps."""
    size = probe_size(engine.model)  # the native size (an upscaler's output at least 64)
    task = probe_task(engine.model)  # a depth or upscaler model's calls are of its own task (bucket)
    probe = Request(prompts=["probe"], negatives=[""], guidance=[7.5], seeds=[0], steps=steps, height=size,
                    width=size, scheduler=None, task=task, strength=0.8 if task == "depth" else None,
                    noise_level=20 if task == "upscale" else None)
    try:
        sizer.admit(probe)
    except ValueError as e:
        log.error("no start-up measurement: one image at the native size does not fit: %s", e)
        return
    t = time.time()
    sizer.measure(engine_run(engine, size, size, steps, 7.5), probe, steps)
    release_free_memory()
    log.info("start-up batch size measurement took %.1f s", time.time() - t)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from grpc_health.v1 import health_pb2
    from grpc_health.v1.health import HealthServicer
    ddir, index = Path(argv[0]), int(argv[1])
    spec = DeploymentSpec.read(ddir)
    logs.setup(f"replica-{index}", spec.log_format)
    replica = spec.replicas[index]
    stats_path = ddir / f"replica-{index}.json"
    t_start = time.time()

    free_at_start = None
    if not replica.host_memory_bytes:  # a host `fastsd serve` could not measure: before loading
        free_at_start = available_memory_bytes("cpu")
    engine = build_engine(spec, replica)
    catalog = LoraCatalog(spec.lora_dir) if spec.lora_dir else None
    default_loras = [tuple(x) for x in spec.loras]
    if default_loras:  # fused before the first request, which then pays no switch
        engine.set_loras(default_loras, allow_pickle=spec.allow_pickle)
    lock = threading.Lock()
    state = {"index": index, "pid": os.getpid(), "port": replica.port, "host": replica.bind,
             "ready": False, "started_at": t_start, "engine": engine.describe()}
    sizer = build_sizer(spec, replica, engine, free_at_start)
    if sizer.mode == "auto":
        write_json(stats_path, {**state, "phase": "measuring batch sizes", "batching": sizer.describe()})
        measure_native(sizer, engine, spec.batch_probe_steps)

    def write_stats():
        with lock:
            write_json(stats_path, {**state, "stats": pipeline.stats.as_dict(), "batching": sizer.describe(),
                                    "queue_depth": pipeline.queue_depth(),
                                    "loras": engine.loras.describe() if engine.loras is not None else None,
                                    "lora_catalog": catalog.describe() if catalog is not None else None,
                                    "updated_at": time.time()})

    pipeline = BatchingPipeline(engine, spec.limits, window=spec.batch_window_ms / 1000.0,
                                on_batch=write_stats, sizer=sizer, loras=catalog,
                                default_loras=default_loras, progress=ReplicaProgress(ddir, index))
    previous = (read_json(stats_path) or {}).get("stats", {})  # counters run on across restarts
    for k, v in previous.items():
        if hasattr(pipeline.stats, k) and isinstance(v, (int, float, dict)):
            setattr(pipeline.stats, k, v)
    servicer = make_servicer(pipeline)
    # a worker for every call the load balancer may admit (it may send them all here), and room for health
    health = HealthServicer()
    server = make_server(servicer, replica.bind, replica.port,
                         workers=len(spec.replicas) * spec.max_images_per_call + spec.queue_limit + 16,
                         stop_key=control.read_stop_key(ddir), health=health)
    stop = servicer.get_stop_event()  # set by MII's Terminate RPC
    graceful_signals(stop.set)
    watch_parent(stop.set)
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    state["ready"] = True
    state["ready_at"] = time.time()
    write_stats()
    log.info("serving %s on %s:%d (start-up %.1f s), max batch %s, window %g ms", spec.model, replica.bind,
             replica.port, time.time() - t_start, spec.max_batch, spec.batch_window_ms)
    last = None
    while not stop.wait(0.5):
        snap = (pipeline.stats.as_dict(), pipeline.queue_depth())
        if snap != last:  # bad requests and timeouts are counted outside batches
            write_stats()
            last = snap
    log.info("stopping")
    health.enter_graceful_shutdown()  # the load balancer stops sending calls here
    server.stop(5).wait(10)
    pipeline.close()
    state["ready"] = False
    write_stats()
    logging.shutdown()
    os._exit(0)  # gRPC and torch worker threads would otherwise hold the exit up

if __name__ == "__main__":
    sys.exit(main())
