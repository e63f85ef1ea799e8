"""The REST gateway's shared HTTP layer (gateway.py) and admission (admission.py), in one process with a
stand-in deployment client: the deadline header, shed or admit with Retry-After, the one error body
with plain messages (issue 24, items 2, 4 and 8), and a real gRPC failure's text never reaching a body."""
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")  # the serving extra
from starlette.testclient import TestClient  # noqa: E402

from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.serving import folders, ports  # noqa: E402
from fastsd.serving.admission import Admission, default_max_queue  # noqa: E402
from fastsd.serving.errors import DeploymentError  # noqa: E402
from fastsd.serving.gateway import Gateway, from_deployment_error, request_deadline  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from fastsd.serving.request import Limits  # noqa: E402
from fastsd.serving.rest import create_app  # noqa: E402
from fastsd.serving.spec import DeploymentSpec, ReplicaPlacement  # noqa: E402

GOOD = {"input_data": {"data": ["a"], "parameters": {"num_inference_steps": 2}}}
# what grpc says when the load balancer is gone (issue 24, item 8): none of it may reach a body
GRPC_TEXT = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50050: Failed to connect "
             "to remote host: connect: Connection refused (111) debug_error_string StatusCode.UNAVAILABLE")
LEAKS = ("ipv4", "127.0.0.1", "debug_error_string", "StatusCode", "Traceback", "/tmp/", "/home/", "/root/")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# -- admission --------------------------------------------------------------------------------------
def test_admission_sheds_beyond_running_plus_queue():
    a = Admission(per_replica=2, max_queue=3, clock=Clock())
    assert a.limit(2) == 7 and a.limit(1) == 5
    assert all(a.try_admit(1) for _ in range(5)) and not a.try_admit(1)
    assert a.try_admit(2) and a.in_flight == 6  # a second replica up: room for its running share
    assert not a.try_admit(0)  # no replica up: nothing is admitted
    assert a.shed == 2 and a.admitted == 6
    assert default_max_queue(3, 4) == 12


def test_retry_after_follows_the_measured_service_rate():
    clock = Clock()
    a = Admission(per_replica=1, max_queue=4, clock=clock)
    assert a.retry_after(1) == 1 and a.service_rate() is None  # nothing measured yet
    for _ in range(5):  # busy 10 s, 5 answered: 0.5 requests/s
        a.try_admit(1)
    for _ in range(5):
        clock.now += 2.0
        a.release()
    assert a.service_rate() == pytest.approx(0.5)
    for _ in range(5):
        a.try_admit(1)
    assert not a.try_admit(1)
    # 5 in flight, 1 running: 4 wait ahead; the next slot after 5 / 0.5 = 10 s
    assert a.retry_after(1) == 10
    assert a.retry_after(0) >= 1  # no replica: a few seconds for the supervisor's restart


def test_request_deadline_header():
    assert request_deadline(None, 300) == 300 and request_deadline("2.5", 300) == 2.5
    assert request_deadline("900", 300) == 300  # the server's --timeout caps the client's
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(InvalidParameter, match="X-Request-Timeout"):
            request_deadline(bad, 300)


@pytest.mark.parametrize("code,status", [("UNAVAILABLE", 503), ("RESOURCE_EXHAUSTED", 429), ("INTERNAL", 500),
                                         ("UNKNOWN", 500), ("DEADLINE_EXCEEDED", 504), ("CANCELLED", 499),
                                         ("PERMISSION_DENIED", 500)])
def test_deployment_errors_become_plain_messages(code, status):
    e = from_deployment_error(DeploymentError(code, GRPC_TEXT + " RuntimeError: /root/x.safetensors", retry_after=7))
    assert e.status == status and not any(leak in e.message for leak in LEAKS), e.message
    assert (e.headers.get("Retry-After") == "7") == (status in (429, 503))
    bad = from_deployment_error(DeploymentError("INVALID_ARGUMENT", "height: got 100; allowed: a multiple of 8"))
    assert bad.status == 422 and bad.param == "height" and bad.message.startswith("height")


# -- the app, with a stand-in client ----------------------------------------------------------------
class FakeClient:
    """Answers like DeploymentClient: `behaviour(timeout, cancel)` returns a reply or raises."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.timeouts = []

    def generate(self, prompts, negatives=None, *, timeout=None, cancel=None, request_id=None, **kwargs):
        self.timeouts.append(timeout)
        return self.behaviour(timeout, cancel)


def spec(**kw):
    return DeploymentSpec(name="gw", model="tiny", replicas=[ReplicaPlacement(0, "127.0.0.1", 1, "127.0.0.1")],
                          limits=Limits(timeout=30), max_batch=1, **kw)


def app_with(behaviour, token=None, **kw):
    client = FakeClient(behaviour)
    s = spec(**kw)
    return TestClient(create_app(s, token, Gateway(s, client, ThreadPoolExecutor(8), token))), client


def image_reply(timeout, cancel):
    from PIL import Image
    from types import SimpleNamespace
    return SimpleNamespace(images=[Image.new("RGB", (8, 8))], nsfw_content_detected=[False], queue_ms=1.0,
                           engine_ms=2.0)


def check_error_body(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert set(doc) >= {"error", "request_id"} and doc["request_id"] == r.headers["x-request-id"]
    assert not any(leak in r.text for leak in LEAKS), r.text
    return doc


def test_deadline_header_reaches_the_call():
    http, client = app_with(image_reply)
    assert http.post("/score", json=GOOD, headers={"X-Request-Timeout": "2.5"}).status_code == 200
    assert http.post("/score", json=GOOD).status_code == 200
    assert client.timeouts == [pytest.approx(2.5, abs=0.1), pytest.approx(30.0, abs=0.1)]
    doc = check_error_body(http.post("/score", json=GOOD, headers={"X-Request-Timeout": "soon"}), 422)
    assert doc["parameter"] == "X-Request-Timeout"


def test_refusals_have_the_one_body_and_retry_after():
    def unavailable(timeout, cancel):
        raise DeploymentError("UNAVAILABLE", GRPC_TEXT, retry_after=4)
    http, _ = app_with(unavailable)
    r = http.post("/score", json=GOOD)
    check_error_body(r, 503)
    assert r.headers["retry-after"] == "4"

    def internal(timeout, cancel):
        raise DeploymentError("INTERNAL", "OSError: [Errno 2] No such file: '/root/loras/x.safetensors'")
    check_error_body(app_with(internal)[0].post("/score", json=GOOD), 500)

    def timeout(t, cancel):
        raise DeploymentError("DEADLINE_EXCEEDED", "Deadline Exceeded")
    doc = check_error_body(app_with(timeout)[0].post("/score", json=GOOD, headers={"X-Request-Timeout": "3"}), 504)
    assert "3 s" in doc["error"]
    http, _ = app_with(image_reply, token="s3cret")
    check_error_body(http.post("/score", json=GOOD), 401)
    check_error_body(http.post("/score", content=b"{", headers={"Authorization": "Bearer s3cret"}), 400)
    check_error_body(http.post("/score", content=b"x" * (2 << 20), headers={"Authorization": "Bearer s3cret"}), 413)


def test_gateway_sheds_at_once_beyond_its_limit():
    """One replica, one image per call, --max-queue 1: two requests in flight; the third gets 429 at once."""
    release = threading.Event()

    def slow(timeout, cancel):
        release.wait(10)
        return image_reply(timeout, cancel)
    http, _ = app_with(slow, max_queue=1)
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(http.post("/score", json=GOOD).status_code))
               for _ in range(2)]
    [t.start() for t in threads]
    time.sleep(0.5)
    t = time.monotonic()
    r = http.post("/score", json=GOOD)
    assert time.monotonic() - t < 1.0
    check_error_body(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    release.set()
    [t.join(10) for t in threads]
    assert codes == [200, 200]
    assert http.post("/score", json=GOOD).status_code == 200  # room again


def test_a_real_grpc_failure_reaches_no_body(tmp_path, monkeypatch):
    """The real client against a load balancer that is gone: gRPC's own UNAVAILABLE text stays inside."""
    from fastsd.serving.client import DeploymentClient
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    port = ports.free_port_block(2)
    s = DeploymentSpec(name="gone", model="tiny", port=port, limits=Limits(timeout=5),
                       replicas=[ReplicaPlacement(0, "127.0.0.1", port + 1, "127.0.0.1")], max_batch=1)
    (tmp_path / "gone").mkdir()
    s.write(tmp_path / "gone")
    (tmp_path / "gone" / "score.py").write_text("")  # MII's record: the client checks the deployment exists
    folders.write_json(tmp_path / "gone" / "balancer.json", {"up": [True]})
    client = DeploymentClient("gone")
    with pytest.raises(DeploymentError) as e:
        client.generate(["a"], timeout=3)
    assert e.value.code == "UNAVAILABLE"  # with gRPC's text in the exception, for logs
    http = TestClient(create_app(s, None, Gateway(s, client, ThreadPoolExecutor(4), None)))
    r = http.post("/score", json=GOOD)
    doc = check_error_body(r, 503)
    assert "retry-after" in r.headers and json.dumps(doc).count("retry later") == 1
