"""The request schema (fastsd/serving/schema.py) is total: Hypothesis throws random JSON, random
query kwargs and random `serve` options at the parsers, in process (no deployment), and every
outcome is a value or a one-line refusal naming the field, never another exception."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsd.errors import InvalidParameter
from fastsd.serving import schema
from fastsd.serving.request import Limits, parse
from fastsd.serving.rest import BadRequest, read_score_body

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_prompts=4, max_images=8, max_pixels=256 * 256, max_steps=20)

# Unicode including lone surrogates (what "\ud800" in a JSON string decodes to)
texts = st.text(st.characters(codec=None, blacklist_categories=()), max_size=30) | st.sampled_from(
    ["\ud800", "a\udfffb", "", " ", "\x00", "a" * (schema.MAX_TEXT_CHARS + 1)])
numbers = (st.integers() | st.integers(min_value=-2**80, max_value=2**80) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, 7, 8, 64, 2**63, 2**64, -1, 1e400, 7.5, 64.0]))
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)
param_names = st.sampled_from([*schema.PARAMS, "negative_prompt", "prompt", "strength", ""]) | texts
params = st.dictionaries(param_names, json_values, max_size=4) | json_values
rows = st.lists(json_values | texts | st.lists(texts, max_size=3) | st.dictionaries(
    st.sampled_from(["prompt", "negative_prompt", "x"]), json_values, max_size=3), max_size=6) | json_values
columns = st.lists(st.sampled_from(["prompt", "negative_prompt", "image"]) | texts, max_size=3) | json_values
input_data = st.fixed_dictionaries({}, optional={"columns": columns, "data": rows, "parameters": params,
                                                 "index": json_values, "extra": json_values})
bodies = st.fixed_dictionaries({"input_data": input_data}, optional={"parameters": params}) | json_values


def to_bytes(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # lone surrogates go out as \ud800 escapes


def check_body(raw: bytes):
    try:
        query = read_score_body(raw, LIMITS)
    except BadRequest as e:
        assert e.status in (400, 422) and e.message and "\n" not in e.message and len(e.message) < 600
        json.dumps({"error": e.message, **e.extra}, allow_nan=False).encode("utf-8")  # what the gateway sends
        return
    # accepted: everything MII's packing and the engine will see is in range
    prompts, negatives, kwargs = query.prompts, query.negatives, query.parameters
    assert 1 <= len(prompts) <= LIMITS.max_prompts and all(p.strip() for p in prompts)
    for p in prompts + (negatives or []):
        p.encode("utf-8")
    for k, v in kwargs.items():
        assert k in schema.PARAMS and isinstance(v, (str, int, float, bool))
        if isinstance(v, int) and not isinstance(v, bool):
            assert -2**63 <= v < 2**63
        if isinstance(v, float):
            assert math.isfinite(v)


@FAST
@given(bodies)
def test_any_json_body_is_parsed_or_refused_in_one_line(doc):
    check_body(to_bytes(doc))


@FAST
@given(st.binary(max_size=200) | st.sampled_from([b"[" * 100_000, b"{" * 5000, b'{"a":' * 3000, b"\xff\xfe",
                                                  b'{"input_data": NaN}', b"1e999999"]))
def test_any_bytes_are_parsed_or_refused(raw):
    check_body(raw)


kwarg_values = st.none() | st.booleans() | numbers | texts | st.lists(st.integers(), max_size=2)
kwargs_dicts = st.dictionaries(param_names, kwarg_values, max_size=5)
prompt_args = st.lists(texts, max_size=5) | texts | json_values


def check_query(prompt, negative, kwargs):
    try:
        r = parse(prompt, negative, kwargs, LIMITS, 64, from_f32=True)
    except InvalidParameter as e:
        assert "\n" not in str(e) and len(str(e)) < 600
        return
    assert 1 <= r.n_images <= LIMITS.max_images and 1 <= r.steps <= LIMITS.max_steps
    assert r.height * r.width <= LIMITS.max_pixels and all(0 <= s < 2**63 for s in r.seeds)


@FAST
@given(prompt_args, st.none() | prompt_args, kwargs_dicts)
def test_any_query_kwargs_are_parsed_or_refused(prompt, negative, kwargs):
    """What the replica receives over gRPC (MII's client, or a raw caller)."""
    check_query(prompt, negative, kwargs)


@pytest.mark.slow
@LONG
@given(bodies, prompt_args, st.none() | prompt_args, kwargs_dicts)
def test_long_fuzz_of_both_parsers(doc, prompt, negative, kwargs):
    check_body(to_bytes(doc))
    check_query(prompt, negative, kwargs)


@pytest.mark.parametrize("raw,status,param", [
    (b'{"input_data": {"data": ["a"], "parameters": {"seed": 99999999999999999999999}}}', 422, "seed"),
    (b'{"input_data": {"data": ["\\ud800"]}}', 422, "prompt"),
    (b'{"input_data": {"data": ["a"], "parameters": []}}', 400, None),
    (b'{"input_data": {"data": ["a"], "parameters": {"guidance_scale": NaN}}}', 422, "guidance_scale"),
    (b'{"input_data": {"data": ["a"], "parameters": {"guidance_scale": Infinity}}}', 422, "guidance_scale"),
    (b'{"input_data": {"data": ["a"], "parameters": {"num_inference_steps": true}}}', 422, "num_inference_steps"),
    (b'{"input_data": {"data": ["a"]}, "extra": 1}', 400, None),
    (b'{"input_data": {"columns": ["prompt", "prompt"], "data": [["a", "b"]]}}', 400, None),
    (b"[" * 100_000, 400, None),
])
def test_the_reported_holes_are_closed(raw, status, param):
    with pytest.raises(BadRequest) as e:
        read_score_body(raw, LIMITS)
    assert e.value.status == status and e.value.param == param, e.value.message


def test_object_rows_and_both_parameter_places():
    q = read_score_body(b'{"input_data": {"columns": ["prompt", "negative_prompt"], "data": '
                        b'[{"prompt": "a", "negative_prompt": "b"}], "parameters": {"seed": 3}}}', LIMITS)
    assert (q.prompts, q.negatives, q.parameters) == (["a"], ["b"], {"seed": 3})


def test_raw_grpc_value_with_no_field_set():
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2 as pb2
    req = pb2.Text2ImageRequest(prompt=["a"], query_kwargs={"seed": pb2.Value()})
    with pytest.raises(InvalidParameter, match="^seed: "):
        schema.unpack_query_kwargs(req.query_kwargs)


def test_one_line_to_add_a_field(monkeypatch):
    """A new field is one entry in the table, and both front doors take it."""
    monkeypatch.setitem(schema.PARAMS, "strength", schema.Param("strength", "float", "how much to change", 0.0, 1.0))
    assert read_score_body(b'{"input_data": {"data": ["a"], "parameters": {"strength": 0.5}}}',
                           LIMITS).parameters == {"strength": 0.5}
    with pytest.raises(BadRequest, match=r"strength: got 1\.5; allowed: a finite number in \[0, 1\]"):
        read_score_body(b'{"input_data": {"data": ["a"], "parameters": {"strength": 1.5}}}', LIMITS)
    assert schema.check_params({"strength": 1}, LIMITS) == {"strength": 1.0}


# -- `fastsd serve` options, checked before anything starts ---------------------------------------
GOOD = dict(replicas=1, port=50050, rest_port=None, metrics_port=None, max_batch=8, batch_window_ms=20.0,
            limits=Limits(), threads=None, max_body_bytes=1 << 20, startup_timeout=600.0, log_format="text",
            ssh_config=None, token=None, host="127.0.0.1", hostfile=None, model="tiny", random_weights=False)


@pytest.mark.parametrize("change,flag", [
    ({"threads": 0}, "--threads"), ({"threads": -1}, "--threads"), ({"replicas": 0}, "--replicas"),
    ({"port": 65535}, "--port"), ({"rest_port": 0}, "--rest-port"), ({"metrics_port": 70000}, "--metrics-port"),
    ({"max_batch": 0}, "--max-batch"), ({"batch_window_ms": float("nan")}, "--batch-window-ms"),
    ({"max_body_bytes": 0}, "--max-body-bytes"), ({"startup_timeout": 0}, "--startup-timeout"),
    ({"limits": Limits(max_prompts=0)}, "--max-prompts"), ({"limits": Limits(max_images=-3)}, "--max-images"),
    ({"limits": Limits(max_pixels=10)}, "--max-pixels"), ({"limits": Limits(max_steps=0)}, "--max-steps"),
    ({"limits": Limits(timeout=float("inf"))}, "--timeout"), ({"log_format": "xml"}, "--log-format"),
    ({"ssh_config": "/nonexistent/ssh_config"}, "--ssh-config"), ({"token": "a b"}, "--token"),
    ({"host": "no such host.invalid"}, "--host"), ({"hostfile": "/nonexistent/hosts"}, "--hostfile"),
    ({"model": "no-such-preset"}, "--model"), ({"model": "./missing.safetensors"}, "--model"),
    ({"model": "sd-1.5x", "random_weights": True}, "--model"),
])
def test_serve_options_checked_first(change, flag):
    from fastsd.serving.deploy import check_serve_options
    check_serve_options(**GOOD)
    with pytest.raises(InvalidParameter) as e:
        check_serve_options(**{**GOOD, **change})
    assert e.value.name == flag


def test_serve_cli_refuses_bad_threads_without_starting(tmp_path, monkeypatch, capsys):
    from fastsd.cli import main
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    for threads in ("0", "-1"):
        assert main(["serve", "--model", "tiny", "--deployment", "x", "--threads", threads]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"fastsd serve: error: --threads: got {threads}; allowed: an integer in [1, 1024]", err
        assert not (tmp_path / "x").exists()
