"""One replica: a fastsd engine hosted by MII's gRPC model server.

    python -m fastsd.serving.replica DEPLOYMENT_DIR INDEX

started by the supervisor. It serves MII's `ModelResponse` servicer (the class behind MII's
`serve_inference`), with three changes made by subclassing, each for a reason:
- MII runs every pipeline call under one lock; the lock is replaced by a no-op so concurrent
  requests reach the batching pipeline together (batcher.py), which serialises the engine itself;
- a bad request becomes INVALID_ARGUMENT with the reason (MII would answer UNKNOWN with
  "Exception calling application"), a timeout DEADLINE_EXCEEDED, other failures INTERNAL;
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

from .common import graceful_signals, read_json, watch_parent, write_json

log = logging.getLogger("fastsd.serving.replica")


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_servicer(pipeline):
    import grpc
    from mii.legacy.grpc_related.modelresponse_server import ModelResponse

    from ..errors import InvalidParameter
    from .batcher import RequestTimeout

    class FastSDModelResponse(ModelResponse):
        def __init__(self, inference_pipeline):
            super().__init__(inference_pipeline)
            self.lock = contextlib.nullcontext()  # the batcher serialises the engine; see module doc

        def Txt2ImgReply(self, request, context):
            try:
                return self._run_inference("Txt2ImgReply", request)
            except InvalidParameter as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except RequestTimeout as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            except Exception as e:  # noqa: BLE001 - the caller gets the reason; the server goes on
                log.exception("request failed")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

        def InpaintingReply(self, request, context):
            """MII's inpainting RPC; without masks it is image-to-image. The images are decoded here under the
            deployment's limits (MII's own unpacking would open any size, decompression bombs included)."""
            try:
                return self._inpaint(request)
            except InvalidParameter as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except RequestTimeout as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            except Exception as e:  # noqa: BLE001 - the caller gets the reason; the server goes on
                log.exception("request failed")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

        def _inpaint(self, request):
            import time as _time

            from mii.legacy.constants import TaskType
            from mii.legacy.method_table import GRPC_METHOD_TABLE
            from mii.legacy.utils import unpack_proto_query_kwargs

            from .. import images as imgs
            limits = self.inference_pipeline.limits
            total = sum(len(b) for b in request.image) + sum(len(b) for b in request.mask_image)
            if total > limits.max_image_bytes:
                raise InvalidParameter("image", f"{total} bytes of images", f"at most {limits.max_image_bytes} "
                                       "bytes of images and masks in one request")
            lim = {"max_bytes": limits.max_image_bytes, "max_pixels": limits.max_pixels}
            image = [imgs.decode(b, "image", **lim) for b in request.image]
            mask = [imgs.decode(b, "mask_image", mode="L", **lim) for b in request.mask_image]
            kwargs = unpack_proto_query_kwargs(request.query_kwargs)
            start = _time.time()
            reply = self.inference_pipeline(prompt=list(request.prompt), image=image, mask_image=mask,
                                            negative_prompt=list(request.negative_prompt), **kwargs)
            return GRPC_METHOD_TABLE[TaskType.INPAINTING].pack_response_to_proto(reply, _time.time() - start, -1)

        def _unsupported(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "this deployment serves text-to-image and inpainting/image-to-image only "
                          "(Txt2ImgReply, InpaintingReply)")

        GeneratorReply = ClassificationReply = QuestionAndAnswerReply = FillMaskReply = _unsupported
        TokenClassificationReply = ZeroShotImgClassificationReply = _unsupported
        CreateSession = DestroySession = _unsupported

    return FastSDModelResponse(pipeline)


def make_server(servicer, host: str, port: int, workers: int | None = None):
    """A gRPC server for MII's ModelResponse service on host:port, refusing a port in use."""
    import grpc
    from mii.legacy.constants import GRPC_MAX_MSG_SIZE, LB_MAX_WORKER_THREADS
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers or LB_MAX_WORKER_THREADS),
        options=[("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
                 ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE),
                 ("grpc.so_reuseport", 0)])
    pb2_grpc.add_ModelResponseServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(grpc_address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise SystemExit(f"cannot listen on {host}:{port}: the port is in use or the address is not local")
    return server


def build_engine(spec: dict, replica: dict):
    import torch

    from ..loading import load_for_backend
    from ..optimize import OptimizeConfig, optimize
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    eng = dict(spec["engine"])
    if replica.get("cuda_visible_devices") is not None:
        eng["device"] = "cuda"
    model = load_for_backend(eng.get("backend", "torch"), spec["model"],
                             random_weights=spec.get("random_weights", False),
                             allow_pickle=spec.get("allow_pickle", False), config=spec.get("config"),
                             safety_checker=eng.get("safety_checker", True))
    return optimize(model, OptimizeConfig(**eng).validated())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir, index = Path(argv[0]), int(argv[1])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s replica-{index} %(levelname)s %(message)s")
    spec = read_json(ddir / "spec.json")
    replica = spec["replicas"][index]
    stats_path = ddir / f"replica-{index}.json"
    t_start = time.time()

    from .batcher import BatchingPipeline
    from .limits import Limits

    engine = build_engine(spec, replica)
    lock = threading.Lock()
    state = {"index": index, "pid": os.getpid(), "port": replica["port"], "host": replica["bind"],
             "ready": False, "started_at": t_start, "engine": engine.describe()}

    def write_stats():
        with lock:
            write_json(stats_path, {**state, "stats": pipeline.stats.as_dict(), "updated_at": time.time()})

    pipeline = BatchingPipeline(engine, Limits(**spec["limits"]), max_batch=spec["max_batch"],
                                window=spec["batch_window_ms"] / 1000.0, on_batch=write_stats)
    previous = (read_json(stats_path) or {}).get("stats", {})  # counters run on across restarts
    for k, v in previous.items():
        if hasattr(pipeline.stats, k) and isinstance(v, (int, float)):
            setattr(pipeline.stats, k, v)
    servicer = make_servicer(pipeline)
    server = make_server(servicer, replica["bind"], replica["port"])
    stop = servicer.get_stop_event()  # set by MII's Terminate RPC
    graceful_signals(stop.set)
    watch_parent(stop.set)
    server.start()
    state["ready"] = True
    state["ready_at"] = time.time()
    write_stats()
    log.info("serving %s on %s:%d (load %.1f s), max batch %d, window %g ms", spec["model"], replica["bind"],
             replica["port"], time.time() - t_start, spec["max_batch"], spec["batch_window_ms"])
    last = None
    while not stop.wait(0.5):
        snap = pipeline.stats.as_dict()
        if snap != last:  # bad requests and timeouts are counted outside batches
            write_stats()
            last = snap
    log.info("stopping")
    server.stop(5).wait(10)
    pipeline.close()
    state["ready"] = False
    write_stats()
    logging.shutdown()
    os._exit(0)  # gRPC and torch worker threads would otherwise hold the exit up

if __name__ == "__main__":
    sys.exit(main())
