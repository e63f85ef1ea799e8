"""The REST gateway: the model cards' online-endpoint scoring format over HTTP, forwarded to the
deployment through its client (client.py, MII's stub; MII's own REST gateway answers HTTP 500 for images).

    python -m fastsd.serving.rest DEPLOYMENT_DIR

POST /score
    {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"],
                    "index": [0], "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}
 -> [{"prompt": "...", "generated_image": "<base64 PNG>", "nsfw_content_detected": false}]
GET /health -> {"status": "ok"} (503 when the load balancer does not answer): liveness; no token.
GET /ready -> 200 when the load balancer and at least one replica answer, else 503: readiness; no token.
GET /metrics -> the Prometheus text format (metrics.py); no token.
Every response carries X-Request-ID (the caller's, else a new one), also in error bodies as
"request_id", and every request gets one access-log line (logs.py).

`data` rows are prompts, or rows with one value per column ("prompt", optionally "negative_prompt"),
as lists or objects; the body is parsed and every field checked (request.py) before anything is forwarded.
Errors are JSON {"error": "...", "request_id": "...", ...}: 400 body not JSON or not the format, 401 token missing or
wrong, 413 body too large, 422 a value out of range (the engine's validation, through the replica),
429 server busy, 503 the load balancer does not answer, 504 timeout (also when no replica is up: the balancer
waits for one until the request times out).

Requests go to the deployment through its one client (client.DeploymentClient), from a thread pool:
MII's client binds to an event loop, so each worker thread has its own handles.
"""

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InvalidParameter
from . import a1111_api, logs, openai_api, wire
from .client import DeploymentClient
from .errors import DeploymentError
from .folders import use_cache_path
from .gateway import Gateway
from .histograms import LATENCY_BOUNDS
from .image_urls import fetch_cells
from .metrics import DeploymentCollector, http_outcome
from .ports import connect_host, port_answers
from .processes import TOKEN_ENV, graceful_signals, watch_parent
from .request import BadBody, Limits, Query, parse_score_body
from .spec import DeploymentSpec

# gRPC status of the deployment's answer -> HTTP status; any other is 500
HTTP_STATUS = {"INVALID_ARGUMENT": 422, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429,
               "UNIMPLEMENTED": 501}

log = logging.getLogger("fastsd.serving.rest")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def read_score_body(body: bytes, limits: Limits | None = None, with_images: bool = False) -> Query:
    """The bytes of a `POST /score` body -> the checked Query (request.parse_score_body), or BadRequest
    with the HTTP status: 400 not JSON or not the format, 422 a value (naming the parameter)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise BadRequest(400, f"the body is not JSON: {str(e)[:200]}") from None
    try:
        return parse_score_body(doc, limits or Limits(), with_images=with_images)
    except BadBody as e:
        raise BadRequest(400, str(e)) from None
    except InvalidParameter as e:
        raise BadRequest(422, str(e), parameter=e.name) from None


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def create_app(spec: DeploymentSpec, token: str | None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    name = spec.name
    limits = spec.limits
    max_body = spec.max_body_bytes
    deployment = DeploymentClient(name)  # waits limits.timeout + 5 s for a reply
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="mii-client")  # one MII handle each
    app = FastAPI(title=f"fastsd deployment {name}", docs_url=None, redoc_url=None, openapi_url=None)
    replicas = [(connect_host(r.host), r.port) for r in spec.replicas]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(name))  # the deployment's figures, as `fastsd status` reads them
    http_requests = Counter("fastsd_http_requests", "HTTP requests, by path, outcome and status code",
                            ["path", "outcome", "code"], registry=registry)
    http_seconds = Histogram("fastsd_http_request_duration_seconds", "HTTP requests end to end", ["path"],
                             buckets=LATENCY_BOUNDS, registry=registry)
    http_in_flight = Gauge("fastsd_http_in_flight_requests", "HTTP requests being answered", registry=registry)
    PROBES = ("/health", "/ready", "/metrics")
    API_PATHS = (*openai_api.PATHS, *a1111_api.PATHS)

    def error(request: Request, status: int, message: str, **extra):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message, "request_id": request.state.request_id, **extra},
                            status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if not token:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(errors="replace"),
                                                                  token.encode())

    @app.middleware("http")
    async def request_id_and_access_log(request: Request, call_next):
        """Every request: an id (X-Request-ID, echoed), metrics, and one access-log line."""
        rid = wire.request_id(request.headers.get("x-request-id"))
        request.state.request_id = rid
        request.state.info = {}
        path = request.url.path if request.url.path in (*PROBES, "/score", *API_PATHS) else "other"
        t0 = time.monotonic()
        http_in_flight.inc()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a bug must not take the gateway down; the caller gets a 500
            log.exception("request %s failed", rid)
            response = JSONResponse({"error": "internal error", "request_id": rid}, status_code=500)
        finally:
            http_in_flight.dec()
        seconds = time.monotonic() - t0
        response.headers["X-Request-ID"] = rid
        if path not in PROBES:
            http_requests.labels(path, http_outcome(response.status_code), str(response.status_code)).inc()
            http_seconds.labels(path).observe(seconds)
            info = request.state.info
            logs.access(request_id=rid, task="text-to-image" if path == "/score" else "-",
                        prompts=info.get("prompts", 0), size=info.get("size", "-"), steps=info.get("steps", "-"),
                        images=info.get("images", 0), status=response.status_code,
                        queue_ms=info.get("queue_ms", "-"), engine_ms=info.get("engine_ms", "-"),
                        total_ms=seconds * 1000)
        return response

    @app.get("/health")
    def health():
        """The process is alive and the load balancer answers (liveness)."""
        ok = port_answers(spec.port, spec.host, 0.5)
        return JSONResponse({"status": "ok" if ok else "unavailable", "deployment": name},
                            status_code=200 if ok else 503)

    @app.get("/ready")
    def ready():
        """At least one replica answers and so does the load balancer (readiness)."""
        up = [port_answers(p, h, 0.5) for h, p in replicas]
        lb = port_answers(spec.port, spec.host, 0.5)
        ok = lb and any(up)
        return JSONResponse({"status": "ready" if ok else "not ready", "deployment": name,
                             "load_balancer": lb, "replicas_up": sum(up), "replicas": len(up)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/score")
    async def score(request: Request):
        if not authorised(request):
            return error(request, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return error(request, 413, f"the body is larger than {max_body} bytes", limit=max_body)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return error(request, 413, f"the body is larger than {max_body} bytes", limit=max_body)
        try:
            query = read_score_body(bytes(body), limits, with_images=True)
        except BadRequest as e:
            return error(request, e.status, e.message, **e.extra)
        kwargs = query.parameters
        info = request.state.info
        info.update(prompts=len(query.prompts), steps=kwargs.get("num_inference_steps", "default"),
                    size=logs.size(kwargs.get("width"), kwargs.get("height")))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, run_query, request, query)

    def run_query(request, query: Query):
        images = {"image": query.image, "mask_image": query.mask_image}
        if limits.image_url_allow:  # allowed URLs are fetched here, before the request is queued
            try:
                images = fetch_cells(images, limits.max_image_bytes, limits.image_url_timeout)
            except InvalidParameter as e:
                return error(request, 422, str(e), parameter=e.name)
        prompts = query.prompts
        try:  # image-to-image is MII's InpaintingReply without masks
            reply = deployment.generate(prompts, query.negatives, image=images["image"] or None,
                                        mask_image=images["mask_image"], request_id=request.state.request_id,
                                        **query.parameters)
        except DeploymentError as e:
            param = str(e).split(":", 1)[0] if e.code == "INVALID_ARGUMENT" else None
            return error(request, HTTP_STATUS.get(e.code, 500), str(e), **({"parameter": param} if param else {}))
        request.state.info.update(images=len(reply.images), queue_ms=reply.queue_ms, engine_ms=reply.engine_ms)
        n_img = len(reply.images) // max(1, len(prompts))
        return JSONResponse([{"prompt": prompts[i // max(1, n_img)], "generated_image": png_b64(img),
                              "nsfw_content_detected": bool(flag)}
                             for i, (img, flag) in enumerate(zip(reply.images, reply.nsfw_content_detected))])

    gateway = Gateway(spec, deployment, pool, token)  # the APIs image clients speak, on the same port and token
    openai_api.mount(app, gateway)
    a1111_api.mount(app, gateway)
    return app


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    spec = DeploymentSpec.read(ddir)
    logs.setup("rest", spec.log_format)
    os.environ["MII_CACHE_PATH"] = str(ddir.parent)
    use_cache_path()
    import uvicorn
    token = os.environ.get(TOKEN_ENV) or None
    app = create_app(spec, token)
    config = uvicorn.Config(app, host=spec.host, port=spec.rest_port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop():
        server.should_exit = True
    watch_parent(stop)
    graceful_signals(stop)
    log.info("REST gateway on http://%s:%d (token %s)", spec.host, spec.rest_port,
             "required" if token else "not required")
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
