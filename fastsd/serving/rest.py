"""The REST gateway: the model cards' online-endpoint scoring format over HTTP, forwarded to the
deployment through its client (client.py, MII's service; MII's own REST gateway answers HTTP 500 for images).

    python -m fastsd.serving.rest DEPLOYMENT_DIR

POST /score
    {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"],
                    "index": [0], "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}
 -> [{"prompt": "...", "generated_image": "<base64 PNG>", "nsfw_content_detected": false}]
GET /health -> {"status": "ok"} (503 when the load balancer does not answer): liveness; no token.
GET /ready -> 200 when the load balancer answers and sees at least one replica healthy, else 503: readiness; no token.
GET /metrics -> the Prometheus text format (metrics.py); no token.
Every response carries X-Request-ID (the caller's, else a new one), also in error bodies as
"request_id", and every request gets one access-log line (logs.py).

`data` rows are prompts, or rows with one value per column ("prompt", optionally "negative_prompt"),
as lists or objects; the body is parsed and every field checked (request.py) before anything is forwarded.
The shared HTTP layer (gateway.py) gives every route on this app the same deadline (X-Request-Timeout,
capped by --timeout), load shedding (429/503 with Retry-After), body limits and timeouts, cancellation
when the client goes away (499 in the access log), and the one error body
{"error": "<plain message>", "request_id": "...", ...}; the statuses are listed there.
The HTTP server (uvicorn) closes a connection whose headers do not arrive within HEADER_TIMEOUT seconds
and takes at most MAX_CONNECTIONS at once; an idle kept-alive connection closes after KEEP_ALIVE_S (slowloris.py).
"""

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InvalidParameter
from . import a1111_api, logs, openai_api, slowloris, wire
from .client import DeploymentClient
from .folders import use_cache_path
from .gateway import ApiError, Gateway, png_b64, score_error
from .histograms import LATENCY_BOUNDS
from .metrics import http_outcome
from .processes import TOKEN_ENV, graceful_signals, watch_parent
from .request import BadBody, Limits, Query, parse_score_body
from .spec import DeploymentSpec

log = logging.getLogger("fastsd.serving.rest")
BadRequest = ApiError  # the name this module's refusals had before gateway.py held them


def read_score_body(body: bytes, limits: Limits | None = None, with_images: bool = False) -> Query:
    """The bytes of a `POST /score` body -> the checked Query (request.parse_score_body), or ApiError
    with the HTTP status: 400 not JSON or not the format, 422 a value (naming the parameter)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
    try:
        return parse_score_body(doc, limits or Limits(), with_images=with_images)
    except BadBody as e:
        raise ApiError(400, str(e)) from None
    except InvalidParameter as e:
        raise ApiError(422, str(e), e.name) from None


def create_app(spec: DeploymentSpec, token: str | None, gateway: Gateway | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    name = spec.name
    limits = spec.limits
    if gateway is None:  # a worker per admitted request: each waits on its gRPC call
        pool = ThreadPoolExecutor(max_workers=Gateway.workers(spec), thread_name_prefix="deployment-call")
        gateway = Gateway(spec, DeploymentClient(name), pool, token)
    gw = gateway
    app = FastAPI(title=f"fastsd deployment {name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw  # other routes mounted on this app use the same layer

    registry = CollectorRegistry(auto_describe=False)
    collector = gw.collector()  # the deployment's figures (MII: as `fastsd status` reads them)
    if collector is not None:
        registry.register(collector)
    http_requests = Counter("fastsd_http_requests", "HTTP requests, by path, outcome and status code",
                            ["path", "outcome", "code"], registry=registry)
    http_seconds = Histogram("fastsd_http_request_duration_seconds", "HTTP requests end to end", ["path"],
                             buckets=LATENCY_BOUNDS, registry=registry)
    http_in_flight = Gauge("fastsd_http_in_flight_requests", "HTTP requests being answered", registry=registry)
    PROBES = ("/health", "/ready", "/metrics")
    API_PATHS = (*openai_api.PATHS, *a1111_api.PATHS)

    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError):  # /score's shape; the APIs write their own
        return score_error(e, request.state.request_id)

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
        """The process is alive and the runtime behind it answers (liveness; Gateway.health)."""
        ok, body = gw.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/ready")
    def ready():
        """At least one replica is serving (readiness; Gateway.readiness)."""
        ok, body = gw.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/score")
    async def score(request: Request):
        gw.check_token(request)
        query = read_score_body(await gw.body(request), limits, with_images=True)
        reply = await gw.generate(request, query)
        return JSONResponse(await gw.run(score_rows, query.prompts, reply))

    openai_api.mount(app, gw)  # the APIs image clients speak, on the same port, token and layer
    a1111_api.mount(app, gw)
    return app


def score_rows(prompts: list[str], reply) -> list[dict]:
    """The reply as /score's rows: one per image, prompt-major, each a base64 PNG."""
    n_img = len(reply.images) // max(1, len(prompts))
    return [{"prompt": prompts[i // max(1, n_img)], "generated_image": png_b64(img),
             "nsfw_content_detected": bool(flag)}
            for i, (img, flag) in enumerate(zip(reply.images, reply.nsfw_content_detected))]


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
    slowloris.install_log_limits()
    slowloris.GuardedH11Protocol.limit = slowloris.max_connections()
    tls = {"ssl_certfile": spec.tls_cert, "ssl_keyfile": spec.tls_key} if spec.tls_cert else {}
    server = uvicorn.Server(slowloris.server_config(app, spec.host, spec.rest_port, **tls))

    def stop():
        server.should_exit = True
    watch_parent(stop)
    graceful_signals(stop)
    log.info("REST gateway on %s://%s:%d (token %s; at most %d connections, headers within %g s)",
             "https" if tls else "http", spec.host, spec.rest_port, "required" if token else "not required",
             slowloris.GuardedH11Protocol.limit, slowloris.HEADER_TIMEOUT)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
