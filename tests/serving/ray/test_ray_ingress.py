"""The Ray ingress without a cluster: the REST gateway's own app (rest.create_app) over RayGateway, with a
stand-in DeploymentHandle. A call whose replica died is sent again; one that never finds a live replica is
503 with Retry-After (never 500); Serve's back-pressure is 429 with Retry-After; the `lora` value is the
multiplexed model id; readiness counts RUNNING engine replicas; bad args are one line naming the argument."""
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.serving import rest  # noqa: E402
from fastsd.serving.ray import ingress  # noqa: E402
from fastsd.serving.ray.config import RayAppConfig  # noqa: E402

BODY = json.dumps({"input_data": {"columns": ["prompt"], "data": ["a red circle"], "index": [0],
                                  "parameters": {"num_inference_steps": 3, "seed": 5}}})
IMAGE = Image.new("RGB", (8, 8), (200, 10, 10))
ANSWER = {"images": [IMAGE], "nsfw": [False], "queue_ms": 1.0, "engine_ms": 2.0}


class Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def result(self, timeout_s=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class Handle:
    """DeploymentHandle's surface the caller uses: options(multiplexed_model_id=...).generate.remote(call)."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls, self.model_ids = list(outcomes), [], []

    def options(self, multiplexed_model_id=""):
        self.model_ids.append(multiplexed_model_id)
        return self

    @property
    def generate(self):
        return self

    def remote(self, call):
        self.calls.append(call)
        return Response(self.outcomes.pop(0))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(ingress, "RETRY_WAIT_S", 0.01)


def client(handle, states=None, token=None):
    spec = RayAppConfig.from_args({"model": "fastsd-shapes", "timeout": 30}).spec()
    gw = ingress.RayGateway(spec, ingress.ServeCaller(handle, 35), ThreadPoolExecutor(4), token, "fastsd")
    gw.replica_states = lambda: states or {"RUNNING": 2}
    return TestClient(rest.create_app(spec, token, gw)), gw


def test_a_dead_replicas_call_is_sent_again():
    handle = Handle(ActorDiedError(), ActorUnavailableError("gone", None), ANSWER)
    http, gw = client(handle)
    r = http.post("/score", content=BODY, headers={"X-Request-ID": "rid-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-1" and len(handle.calls) == 3
    got = Image.open(io.BytesIO(base64.b64decode(r.json()[0]["generated_image"])))
    assert list(got.getdata()) == list(IMAGE.getdata()) and gw.client.retries == 2
    assert handle.calls[0]["parameters"] == {"num_inference_steps": 3, "seed": 5}
    assert handle.calls[-1]["seconds"] <= handle.calls[0]["seconds"] <= 30 and handle.calls[0]["request_id"] == "rid-1"


def test_no_live_replica_is_503_with_retry_after_never_500():
    http, _ = client(Handle(*[ActorDiedError()] * ingress.MAX_TRIES))
    r = http.post("/score", content=BODY)
    assert r.status_code == 503 and r.headers["retry-after"] == str(ingress.RETRY_AFTER_S)
    assert "not available" in r.json()["error"] and r.json()["request_id"]


def test_back_pressure_is_429_with_retry_after_in_each_apis_shape():
    http, _ = client(Handle(BackPressureError(num_queued_requests=9, max_queued_requests=8)))
    r = http.post("/score", content=BODY)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "capacity" in r.json()["error"]
    http, _ = client(Handle(BackPressureError(num_queued_requests=9, max_queued_requests=8)))
    r = http.post("/v1/images/generations", json={"prompt": "a red circle", "n": 1})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


def test_the_engines_refusal_names_the_parameter_and_lora_is_the_model_id():
    handle = Handle({"error": "INVALID_ARGUMENT", "message": "lora: got 'x'; allowed: speckle"})
    http, _ = client(handle)
    body = json.loads(BODY)
    body["input_data"]["parameters"]["lora"] = "x"
    r = http.post("/score", content=json.dumps(body))
    assert r.status_code == 422 and r.json()["parameter"] == "lora" and handle.model_ids == ["x"]


def test_probes_token_and_interrupt():
    http, _ = client(Handle(), states={"RUNNING": 1, "STARTING": 1}, token="t0k")
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["replicas_up"] == 1 and ready.json()["replicas"] == 2
    assert http.get("/health").json()["runtime"] == "ray"
    assert http.post("/score", content=BODY).status_code == 401
    r = http.post("/sdapi/v1/interrupt", headers={"Authorization": "Bearer t0k"})
    assert r.status_code == 501 and "Ray" in r.json()["detail"]
    http, _ = client(Handle(), states={"STARTING": 2})
    assert http.get("/ready").status_code == 503


@pytest.mark.parametrize("args, name", [
    ({"num_replicas": "two"}, "num_replicas"), ({"num_replicas": 2, "max_replicas": 3}, "num_replicas"),
    ({"max_batch": 0}, "max_batch"), ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"ray_actor_options": {"memory": 1}}, "ray_actor_options"), ({"num_gpus": -1}, "num_gpus"),
    ({"profile": "warp"}, "profile"), ({"dtype": "fp8"}, "dtype"), ({"target_ongoing_requests": 0},
                                                                       "target_ongoing_requests"),
    ({"colour": "red"}, "colour"), ({"timeout": "soon"}, "timeout"), ({"random_weights": "maybe"}, "random_weights")])
def test_a_bad_argument_is_named(args, name):
    with pytest.raises(InvalidParameter) as e:
        RayAppConfig.from_args({"model": "fastsd-shapes", **args})
    assert e.value.name == name and "\n" not in str(e.value)


def test_arguments_as_serve_run_gives_them():
    cfg = RayAppConfig.from_args({"model": "fastsd-shapes", "min_replicas": "1", "max_replicas": "4",
                                  "target_ongoing_requests": "2", "num_cpus": "2", "max_batch": "2",
                                  "random_weights": "true"})
    assert cfg.num_replicas is None and cfg.autoscaling == {"min_replicas": 1, "max_replicas": 4,
                                                            "target_ongoing_requests": 2.0}
    assert cfg.actor_options == {"num_cpus": 2} and cfg.ongoing == 4 and cfg.queued == 16 and cfg.random_weights
    gpu = RayAppConfig.from_args({"model": "fastsd-shapes", "ray_actor_options": {"num_gpus": 1, "num_cpus": 0}})
    assert gpu.actor_options == {"num_gpus": 1, "num_cpus": 0} and gpu.engine()["device"] == "cuda"
