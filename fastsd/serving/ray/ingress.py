"""The Ray Serve application's HTTP ingress: the REST gateway's own app (rest.create_app: `POST /score`,
the OpenAI and A1111 routes, /health, /ready, /metrics, the one request parser, error shapes, token and
request ids), with the engine deployment behind it in place of an MII deployment.

`RayGateway` is the gateway (gateway.py) with another runtime behind the same routes:
- its client is `ServeCaller`, which calls the engine deployment through a DeploymentHandle with
  DeploymentClient.generate's signature and errors (DeploymentError with a gRPC status name), so the
  routes' deadline, cancellation, error mapping and access log are the gateway's;
- the `lora` value of a request is its multiplexed model id;
- load shedding is Serve's: past the engine deployment's max_queued_requests the handle refuses at once
  (BackPressureError), answered 429 with Retry-After; with no engine replica at all, 503 with Retry-After;
- a call whose replica died (RayActorError: ActorDiedError, ActorUnavailableError) is sent again, to another
  replica once Serve's router has dropped the dead one, within the request's deadline; when no replica
  answers it is 503 with Retry-After, never 500. The engine runs a request at most to its deadline, so a
  retried request is answered once;
- readiness counts the engine replicas Serve reports RUNNING; A1111's /interrupt and /skip answer 501 here
  (an interrupt would have to reach every engine replica; the request's deadline and cancellation do stop
  its engine call).
The ingress asks Ray for no CPU (num_cpus 0): it only parses, forwards and encodes PNGs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import DeploymentError
from ..gateway import ApiError, Gateway
from ..processes import TOKEN_ENV
from ..rest import create_app
from ..spec import DeploymentSpec
from .config import ENGINE

log = logging.getLogger("fastsd.serving.ray")
RETRY_AFTER_S = 2      # told on a 503 when no engine replica answered
RETRY_WAIT_S = 0.5     # between tries of a call whose replica died
MAX_TRIES = 5          # tries of one call whose replicas die
POLL_S = 0.05          # between looks at the caller's cancel event
STATUS_TTL_S = 1.0     # how long readiness trusts Serve's replica states


@dataclass
class ServeReply:
    """What the routes read of an answer (DeploymentReply's attributes)."""
    images: list
    nsfw_content_detected: list
    queue_ms: float | str = "-"
    engine_ms: float | str = "-"


def _died_errors() -> tuple:
    """A call's replica (or its node, or its process) died: ActorDiedError and ActorUnavailableError are
    RayActorErrors."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    return (RayActorError, NodeDiedError, WorkerCrashedError)


class ServeCaller:
    """DeploymentClient.generate over a Ray Serve DeploymentHandle of the engine deployment (blocking; the
    gateway calls it from its thread pool)."""

    def __init__(self, handle, timeout: float):
        self.handle = handle
        self.timeout = timeout
        self.retries = 0  # calls sent again because their replica died

    def generate(self, prompts: list[str], negatives: list[str] | None = None, *, image=None, mask_image=None,
                 request_id: str | None = None, timeout: float | None = None,
                 cancel: threading.Event | None = None, **kwargs) -> ServeReply:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
        params = {k: v for k, v in kwargs.items() if v is not None}
        as_list = (lambda x: [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x])
        end = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        lora = params.get("lora")
        handle = self.handle.options(multiplexed_model_id=lora if isinstance(lora, str) else "")
        for attempt in range(1, MAX_TRIES + 1):
            left = end - time.monotonic()
            if left <= 0:
                raise DeploymentError("DEADLINE_EXCEEDED", "the request's deadline passed")
            call = {"prompt": list(prompts), "negative_prompt": list(negatives) if negatives else None,
                    "parameters": params, "image": [bytes(b) for b in as_list(image)],
                    "mask_image": [bytes(b) for b in as_list(mask_image)], "seconds": left,
                    "request_id": request_id}
            response = handle.generate.remote(call)
            try:
                out = self._wait(response, end, cancel)
            except BackPressureError:
                raise DeploymentError("RESOURCE_EXHAUSTED", "every engine replica's queue is full",
                                      retry_after=1) from None
            except DeploymentUnavailableError:
                raise DeploymentError("UNAVAILABLE", "no engine replica", retry_after=RETRY_AFTER_S) from None
            except RequestCancelledError:
                raise DeploymentError("CANCELLED", "the request was cancelled") from None
            except _died_errors() as e:
                self.retries += 1
                log.warning("request %s: its engine replica died (%s); try %d of %d", request_id or "-",
                            type(e).__name__, attempt, MAX_TRIES)
                if cancel is not None and cancel.is_set():
                    raise DeploymentError("CANCELLED", "the caller cancelled the request") from None
                time.sleep(min(RETRY_WAIT_S * attempt, max(0.0, end - time.monotonic())))
                continue
            if "error" in out:
                raise DeploymentError(out["error"], out["message"])
            return ServeReply(out["images"], out["nsfw"], out["queue_ms"], out["engine_ms"])
        raise DeploymentError("UNAVAILABLE", "no engine replica answered", retry_after=RETRY_AFTER_S)

    @staticmethod
    def _wait(response, end: float, cancel: threading.Event | None) -> dict:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                response.cancel()
                raise DeploymentError("DEADLINE_EXCEEDED", "the request's deadline passed")
            try:
                return response.result(timeout_s=min(left, POLL_S) if cancel is not None else left)
            except TimeoutError:
                if cancel is not None and cancel.is_set():
                    response.cancel()
                    raise DeploymentError("CANCELLED", "the caller cancelled the request") from None


class RayGateway(Gateway):
    """The shared HTTP layer, with the engine deployment behind it (see the module's doc)."""

    def __init__(self, spec: DeploymentSpec, caller: ServeCaller, pool, token: str | None, app_name: str | None):
        super().__init__(spec, caller, pool, token)
        self.app_name = app_name
        self._states: tuple[float, dict] = (0.0, {})

    def replica_states(self) -> dict:
        """{state: count} of the engine deployment's replicas, as Serve reports them (cached STATUS_TTL_S)."""
        at, states = self._states
        if time.monotonic() - at > STATUS_TTL_S:
            from ray import serve
            try:
                app = serve.status().applications.get(self.app_name)
                dep = app.deployments.get(ENGINE) if app else None
                states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
            except Exception:  # noqa: BLE001 - the controller not answering is "unknown", not a failed probe
                log.exception("serve.status() failed")
                states = {}
            self._states = (time.monotonic(), states)
        return states

    def health(self) -> tuple[bool, dict]:
        return True, {"status": "ok", "deployment": self.spec.name, "runtime": "ray"}

    def readiness(self) -> tuple[bool, dict]:
        states = self.replica_states()
        up = states.get("RUNNING", 0)
        return up > 0, {"status": "ready" if up else "not ready", "deployment": self.spec.name, "runtime": "ray",
                        "replicas_up": up, "replicas": sum(states.values()), "replica_states": states}

    def admit(self):
        return contextlib.nullcontext()  # Serve sheds: the engine deployment's max_queued_requests

    def collector(self):
        return None  # the HTTP figures only; Ray exports each replica's own (its metrics port)

    def interrupt(self) -> None:
        raise ApiError(501, "interrupt: not served on the Ray runtime (a request's deadline, X-Request-Timeout, "
                            "and closing its connection stop its engine call)")

    def furthest_progress(self) -> dict | None:
        return None  # no engine replica's steps are visible here: /sdapi/v1/progress shows none running


class Ingress:
    """The ingress deployment (serve.ingress with __serve_build_asgi_app__: the app is built in the replica)."""

    def __init__(self, spec: DeploymentSpec, token: str | None, engine, workers: int):
        from ray import serve
        self.spec = spec
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.caller = ServeCaller(engine, spec.limits.timeout + 5.0)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-call")
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - outside a replica (unit tests): the default application
            app_name = "default"
        self.gateway = RayGateway(spec, self.caller, self.pool, self.token, app_name)

    def __serve_build_asgi_app__(self):
        return create_app(self.spec, self.token, self.gateway)
