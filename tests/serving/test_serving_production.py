"""A deployment as an operator runs it: fuzzed REST bodies, MII query kwargs and raw gRPC messages
(Hypothesis) never get a 5xx, never hang and never restart a replica; /metrics agrees with
`fastsd status --json` after a known load; request ids reach the replies and the access log; /ready
and /health; the load balancer and the REST gateway come back after SIGKILL. One deployment (one
replica of the tiny model with tight limits, REST, a metrics port, JSON logs) is shared by the
module; tests run in file order."""
import asyncio
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request

import grpc
import mii  # noqa: F401 - the serving extra; `make test` installs it, so a missing one fails here
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mii.legacy.grpc_related.proto import legacymodelresponse_pb2 as pb2
from prometheus_client.parser import text_string_to_metric_families

from deployment_cleanup import end_deployment
from fastsd.serving import folders, ports
from fastsd.serving.status import status

pytestmark = pytest.mark.timeout(900)
TIMEOUT = 30  # the deployment's per-request timeout
MAX_STEPS = 3
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_LONG = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GOOD = {"input_data": {"data": ["a red cube"], "parameters": {"num_inference_steps": 1, "seed": 1}}}
METHOD = "/legacymodelresponse.ModelResponse/Txt2ImgReply"


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    import subprocess
    cache = tmp_path_factory.mktemp("mii")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    port = ports.free_port_block(4)  # load balancer, replica, REST, metrics
    rest_port, metrics_port = port + 2, port + 3
    name = f"prod{os.getpid()}"
    info = {"name": name, "port": port, "rest": rest_port, "metrics": metrics_port, "dir": cache / name}
    try:
        p = subprocess.run([sys.executable, "-m", "fastsd.cli", "serve", "--model", "tiny", "--deployment", name,
                            "--port", str(port), "--rest-port", str(rest_port), "--metrics-port", str(metrics_port),
                            "--threads", "1", "--max-steps", str(MAX_STEPS), "--max-pixels", str(128 * 128),
                            "--max-prompts", "2", "--max-images", "2", "--timeout", str(TIMEOUT),
                            "--batch-window-ms", "0", "--log-format", "json", "--startup-timeout", "500"],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, **ENV))
        assert p.returncode == 0, p.stdout + p.stderr
        yield info
    finally:
        try:
            end_deployment(name, info["dir"])
        finally:
            if old is None:
                os.environ.pop("MII_CACHE_PATH", None)
            else:
                os.environ["MII_CACHE_PATH"] = old


def http(port, path, body=None, headers=None, timeout=TIMEOUT + 15):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 method="POST" if body is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def score(dep, doc, headers=None):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc, allow_nan=True).encode()
    return http(dep["rest"], "/score", raw, {"Content-Type": "application/json", **(headers or {})})


def pids(dep):
    s = status(dep["name"])
    return {r["index"]: r["pid"] for r in s["replicas"]}, [r["restarts"] for r in s["replicas"]]


def wait_until(check, timeout=180, step=0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(step)
    return check()


def test_fresh_deployment_counts_no_request(dep):
    """`serve`'s readiness ping went through balancer and replica, and is in no count."""
    s = status(dep["name"])
    assert s["balancer"]["requests"] == 0 and s["balancer"]["errors"] == {} and s["balancer"]["codes"] == {}
    assert s["totals"].get("bad_requests", 0) == 0 and s["requests_served"] == 0
    assert total(scrape(dep["metrics"]), "fastsd_requests_total") == 0


# -- fuzzing ----------------------------------------------------------------------------------------
texts = st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "", " ", "x" * 20_000])
numbers = (st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, 2, 64, 72, 2**63, 2**64, -1, 7.5]))
json_values = st.recursive(st.none() | st.booleans() | numbers | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=8)
names = st.sampled_from(["num_inference_steps", "guidance_scale", "height", "width", "seed", "scheduler",
                         "num_images_per_prompt", "negative_prompt", "strength"]) | texts
bodies = (st.fixed_dictionaries({"input_data": st.fixed_dictionaries(
    {"data": st.lists(texts | json_values, max_size=3) | json_values},
    optional={"columns": st.lists(st.sampled_from(["prompt", "negative_prompt"]) | texts, max_size=2),
              "parameters": st.dictionaries(names, json_values, max_size=3) | json_values})})
          | json_values).map(lambda d: json.dumps(d, allow_nan=True).encode()) | st.binary(max_size=64) \
    | st.sampled_from([b"[" * 50_000, b'{"input_data": {"data": ["a"], "parameters": {"seed": 1e999}}}'])


def rest_case(dep, raw, check_good=True):
    t = time.monotonic()
    code, body, headers = score(dep, raw)
    assert code < 500, (raw[:200], code, body[:300])
    assert time.monotonic() - t < TIMEOUT + 5  # no hang past the request timeout
    assert headers.get("x-request-id")
    if code >= 400:
        doc = json.loads(body)
        assert doc["error"] and doc["request_id"] == headers["x-request-id"]
    if check_good:
        assert score(dep, GOOD)[0] == 200  # still answers a good request


def rest_fuzz(dep, fuzz_settings):
    before = pids(dep)

    @fuzz_settings
    @given(bodies)
    def run(raw):
        rest_case(dep, raw)
    run()
    assert pids(dep) == before  # no replica restarted because of a request


def test_rest_fuzz_never_5xx(dep):
    rest_fuzz(dep, FUZZ)


mii_kwargs = st.dictionaries(names, st.booleans() | st.integers(min_value=-2**63, max_value=2**63 - 1)
                             | st.floats(allow_nan=True, allow_infinity=True, width=32) | texts, max_size=3)
prompts = st.lists(texts, max_size=3)


def test_mii_client_fuzz_never_fails_badly(dep):
    mii_fuzz(dep, FUZZ)


def mii_fuzz(dep, fuzz_settings):
    """MII's own client: every answer is images or INVALID_ARGUMENT, never another status."""
    before = pids(dep)
    asyncio.set_event_loop(asyncio.new_event_loop())
    client = mii.legacy.mii_query_handle(dep["name"])

    @fuzz_settings
    @given(prompts, prompts, mii_kwargs)
    def run(prompt, negative, kwargs):
        t = time.monotonic()
        try:
            client.query({"prompt": prompt, "negative_prompt": negative}, **kwargs)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (prompt, negative, kwargs, e.code(), e.details())
        except (ValueError, UnicodeEncodeError, TypeError):
            pass  # refused by MII's client before sending (e.g. a lone surrogate cannot be packed)
        assert time.monotonic() - t < TIMEOUT + 5
        assert len(client.query({"prompt": ["a"], "negative_prompt": [""]}, num_inference_steps=1).images) == 1
    run()
    assert pids(dep) == before


raw_values = st.builds(pb2.Value) | st.builds(lambda v: pb2.Value(svalue=v), st.text(max_size=10)) \
    | st.builds(lambda v: pb2.Value(ivalue=v), st.integers(min_value=-2**63, max_value=2**63 - 1)) \
    | st.builds(lambda v: pb2.Value(fvalue=v), st.floats(width=32)) | st.builds(lambda v: pb2.Value(bvalue=v),
                                                                                st.booleans())
raw_messages = st.builds(lambda p, n, kw: pb2.Text2ImageRequest(prompt=p, negative_prompt=n,
                                                                query_kwargs=kw).SerializeToString(),
                         st.lists(st.text(max_size=10), max_size=3), st.lists(st.text(max_size=10), max_size=3),
                         st.dictionaries(names.filter(lambda s: "\ud800" not in s and "\udfff" not in s), raw_values,
                                         max_size=3)) | st.binary(max_size=64)


def test_raw_grpc_fuzz_never_fails_badly(dep):
    raw_fuzz(dep, FUZZ)


def raw_fuzz(dep, fuzz_settings):
    """Any bytes on MII's method, straight to the load balancer: OK or INVALID_ARGUMENT only."""
    before = pids(dep)
    channel = grpc.insecure_channel(f"127.0.0.1:{dep['port']}")
    call = channel.unary_unary(METHOD)
    good = pb2.Text2ImageRequest(prompt=["a"], negative_prompt=[""],
                                 query_kwargs={"num_inference_steps": pb2.Value(ivalue=1)}).SerializeToString()

    @fuzz_settings
    @given(raw_messages)
    def run(data):
        try:
            call(data, timeout=TIMEOUT + 5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (data[:100], e.code(), e.details())
        call(good, timeout=TIMEOUT + 5)
    run()
    channel.close()
    assert pids(dep) == before


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_long_fuzz(dep):
    """The bigger run (pytest -m slow): every front door, 400 examples each."""
    rest_fuzz(dep, FUZZ_LONG)
    mii_fuzz(dep, FUZZ_LONG)
    raw_fuzz(dep, FUZZ_LONG)


# -- metrics, request ids, logs -------------------------------------------------------------------
def scrape(port) -> dict:
    code, body, headers = http(port, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples, name, **labels):
    return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


def settled(dep):
    """status once the balancer and the replica have written their files (every 0.5 s)."""
    last = None
    for _ in range(40):
        s = status(dep["name"])
        key = json.dumps([s["balancer"], s["totals"]], sort_keys=True, default=str)
        if key == last and s["balancer"]["in_flight"] == 0:
            return s
        last = key
        time.sleep(0.6)
    return s


def test_metrics_agree_with_status_after_a_known_load(dep):
    before, m0 = settled(dep), scrape(dep["rest"])
    rid = "known-load-1"
    for i in range(3):
        assert score(dep, {"input_data": {"data": [f"p{i}"], "parameters": {"num_inference_steps": 1}}},
                     {"X-Request-ID": f"{rid}-{i}"})[0] == 200
    assert score(dep, {"input_data": {"data": ["a"], "parameters": {"seed": -1}}})[0] == 422  # refused at REST
    asyncio.set_event_loop(asyncio.new_event_loop())
    client = mii.legacy.mii_query_handle(dep["name"])
    assert len(client.query({"prompt": ["a", "b"], "negative_prompt": ["", ""]}, num_inference_steps=1).images) == 2
    with pytest.raises(grpc.aio.AioRpcError):
        client.query({"prompt": ["a"], "negative_prompt": [""]}, num_inference_steps=MAX_STEPS + 1)
    after = settled(dep)
    for port in (dep["rest"], dep["metrics"]):
        m = scrape(port)
        codes = after["balancer"]["codes"]["text-to-image"]
        assert total(m, "fastsd_requests_total", code="OK") == codes["OK"]
        assert total(m, "fastsd_requests_total", code="INVALID_ARGUMENT", outcome="bad_request") == \
            codes["INVALID_ARGUMENT"]
        assert total(m, "fastsd_requests_total") == after["balancer"]["requests"]
        assert total(m, "fastsd_images_generated_total") == after["totals"]["images"]
        assert total(m, "fastsd_engine_calls_total") == after["totals"]["batches"]
        assert total(m, "fastsd_failovers_total") == after["balancer"]["failovers"]
        assert total(m, "fastsd_request_duration_seconds_count") == after["balancer"]["latency"]["total"]["count"]
        assert total(m, "fastsd_engine_seconds_count") == after["balancer"]["latency"]["engine"]["count"]
        assert total(m, "fastsd_replica_up") == sum(r["state"] == "up" for r in after["replicas"]) == 1
        assert total(m, "fastsd_replica_restarts_total") == sum(r["restarts"] for r in after["replicas"])
        assert total(m, "fastsd_in_flight_requests") == 0
    # the known load, counted once each (the REST-refused one never reached the balancer)
    b0 = before["balancer"]["codes"].get("text-to-image", {})
    assert codes["OK"] - b0.get("OK", 0) == 4 and codes["INVALID_ARGUMENT"] - b0.get("INVALID_ARGUMENT", 0) == 1
    assert after["totals"]["images"] - before["totals"].get("images", 0) == 5
    m = scrape(dep["rest"])
    assert total(m, "fastsd_http_requests_total", path="/score", code="200") - \
        total(m0, "fastsd_http_requests_total", path="/score", code="200") == 3
    assert total(m, "fastsd_http_requests_total", path="/score", code="422", outcome="bad_request") - \
        total(m0, "fastsd_http_requests_total", path="/score", code="422") == 1
    assert total(m, "fastsd_batch_requests_count") == after["totals"]["batches"]
    # request ids: in the access log of both the gateway and the balancer, one line per request
    for log_name in ("rest.log", "balancer.log"):
        lines = [json.loads(x) for x in (dep["dir"] / log_name).read_text().splitlines() if x.startswith("{")]
        access = [x["access"] for x in lines if x.get("name") == "fastsd.access"]
        mine = [a for a in access if str(a["request_id"]).startswith(rid)]
        assert sorted(a["request_id"] for a in mine) == [f"{rid}-{i}" for i in range(3)], log_name
        assert all(a["images"] == 1 and a["steps"] == 1 and isinstance(a["total_ms"], float) for a in mine)


def test_request_id_echoed(dep):
    code, body, headers = score(dep, {"input_data": {"data": ["a"], "parameters": {"height": 100}}},
                                {"X-Request-ID": "my-id-42"})
    assert code == 422 and headers["x-request-id"] == "my-id-42"
    doc = json.loads(body)
    assert doc["request_id"] == "my-id-42" and doc["parameter"] == "height"
    code, _, headers = score(dep, GOOD, {"X-Request-ID": "bad id with spaces"})
    assert code == 200 and len(headers["x-request-id"]) == 32  # a new one instead of a header it cannot echo
    channel = grpc.insecure_channel(f"127.0.0.1:{dep['port']}")
    good = pb2.Text2ImageRequest(prompt=["a"], negative_prompt=[""],
                                 query_kwargs={"num_inference_steps": pb2.Value(ivalue=1)}).SerializeToString()
    _, call = channel.unary_unary(METHOD).with_call(good, metadata=[("x-request-id", "grpc-id-7")], timeout=60)
    trailers = dict(call.trailing_metadata())
    assert trailers["x-request-id"] == "grpc-id-7" and float(trailers["fastsd-engine-ms"]) > 0
    channel.close()


# -- failures an orchestrator sees ----------------------------------------------------------------
def child_pid(dep, child):
    return folders.read_json(dep["dir"] / "state.json")["children"][child]["pid"]


def test_killed_balancer_comes_back_and_answers(dep):
    old = child_pid(dep, "balancer")
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: child_pid(dep, "balancer") != old and ports.port_answers(dep["port"]))
    assert wait_until(lambda: http(dep["rest"], "/health")[0] == 200)
    assert wait_until(lambda: score(dep, GOOD)[0] == 200, timeout=60, step=1)
    s = status(dep["name"])
    assert s["balancer"]["requests"] > 0  # its counters ran on across the restart


def test_killed_rest_gateway_comes_back_and_answers(dep):
    old = child_pid(dep, "rest")
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: child_pid(dep, "rest") != old)
    assert wait_until(lambda: ports.port_answers(dep["rest"]))
    assert score(dep, GOOD)[0] == 200
    assert status(dep["name"])["rest"]["restarts"] >= 1


def test_ready_follows_the_replicas_health_follows_the_process(dep):
    assert http(dep["rest"], "/ready")[0] == 200 and http(dep["rest"], "/health")[0] == 200
    victim = status(dep["name"])["replicas"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    code, body, _ = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(http(dep["rest"], "/ready")), 30)
    assert code == 503 and json.loads(body)["replicas_up"] == 0
    assert http(dep["rest"], "/health")[0] == 200  # alive, not ready: an orchestrator waits, not restarts
    assert http(dep["rest"], "/metrics")[0] == 200
    assert wait_until(lambda: http(dep["rest"], "/ready")[0] == 200)
    assert wait_until(lambda: status(dep["name"])["replicas"][0]["state"] == "up")
    m = scrape(dep["metrics"])
    assert total(m, "fastsd_replica_restarts_total") == 1 and total(m, "fastsd_replica_up") == 1
    assert not math.isnan(total(m, "fastsd_queue_depth"))
