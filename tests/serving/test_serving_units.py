"""Serving pieces in one process: request limits, the REST body format, the batcher (with the tiny
engine), and MII's model server with the fastsd servicer (error codes, timeout)."""
import threading
import time

import numpy as np
import pytest

import mii  # noqa: E402,F401 - the serving extra: `make test` installs it, so a missing one fails, not skips

from fastsd.errors import InvalidParameter
from fastsd.serving import ports
from fastsd.serving.batcher import BatchingPipeline, RequestTimeout
from fastsd.serving.request import Limits, _f32_to_float, parse
from fastsd.serving.rest import BadRequest, read_score_body


# -- limits -----------------------------------------------------------------------------------------
def test_parse_normalises_per_image():
    r = parse(["a", "b"], ["", "neg"], {"num_images_per_prompt": 2, "seed": 5, "num_inference_steps": 3},
              Limits(), 64)
    assert r.prompts == ["a", "a", "b", "b"] and r.negatives == ["", "", "neg", "neg"]
    assert r.seeds == [5, 6, 7, 8] and r.steps == 3 and (r.height, r.width) == (64, 64)
    assert parse(["a"], [], {}, Limits(), 64).negatives == [""]  # MII sends [] when none was given


def test_float32_values_come_back_as_typed():
    import struct
    f32 = struct.unpack("<f", struct.pack("<f", 7.3))[0]
    assert f32 != 7.3 and _f32_to_float(f32) == 7.3 and _f32_to_float(7.5) == 7.5


@pytest.mark.parametrize("prompt,kwargs,name", [
    ([], {}, "prompt"),
    ([""], {}, "prompt"),
    (["a"] * 9, {}, "prompt"),
    (["a"], {"num_inference_steps": 151}, "num_inference_steps"),
    (["a"], {"num_inference_steps": "fifty"}, "num_inference_steps"),
    (["a"], {"height": 100}, "height"),
    (["a"], {"height": 2048, "width": 2048}, "height x width"),
    (["a"], {"guidance_scale": -1.0}, "guidance_scale"),
    (["a"], {"seed": "x"}, "seed"),
    (["a"], {"seed": -1}, "seed"),
    (["a"], {"scheduler": "nope"}, "scheduler"),
    (["a"], {"num_images_per_prompt": 17}, "num_images_per_prompt"),
    (["a"], {"bogus": 1}, "bogus"),
])
def test_parse_refuses(prompt, kwargs, name):
    with pytest.raises(InvalidParameter) as e:
        parse(prompt, None, kwargs, Limits(), 64)
    assert e.value.name == name and str(e.value).startswith(name)


# -- REST body --------------------------------------------------------------------------------------
SAMPLE = (b'{"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"], '
          b'"index": [0], "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}')


def test_model_card_body():
    query = read_score_body(SAMPLE)
    assert query.prompts == ["a photograph of an astronaut riding a horse"] and query.negatives is None
    assert query.parameters == {"num_inference_steps": 50, "guidance_scale": 7.5}
    query = read_score_body(b'{"input_data": {"columns": ["prompt", "negative_prompt"], '
                            b'"data": [["a", "b"], ["c", ""]]}}')
    assert query.prompts == ["a", "c"] and query.negatives == ["b", ""]


@pytest.mark.parametrize("body,status", [
    (b"nope", 400), (b"[]", 400), (b'{"input_data": {"columns": ["text"], "data": ["a"]}}', 400),
    (b'{"input_data": {"data": []}}', 400), (b'{"input_data": {"data": [3]}}', 422),
    (b'{"input_data": {"data": ["a"], "parameters": {"seed": null}}}', 422),
    (b'{"input_data": {"data": ["a"], "parameters": {"seed": [1, 2]}}}', 422),
    (b'{"input_data": {"data": ["a"], "parameters": {"strenght": 1}}}', 422),
])
def test_bad_bodies(body, status):
    with pytest.raises(BadRequest) as e:
        read_score_body(body)
    assert e.value.status == status and e.value.message


# -- the batcher ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from fastsd import load_model, optimize
    return optimize(load_model("tiny"), dtype="fp32")


def test_batch_merges_and_matches_alone(engine):
    pipe = BatchingPipeline(engine, max_batch=8, window=0.5)
    try:
        jobs = [(["a red cube"], 11), (["a blue ball", "a cat"], 20), (["a dog"], 3)]
        out = [None] * len(jobs)

        def call(i):
            p, seed = jobs[i]
            out[i] = pipe(prompt=p, negative_prompt=[""] * len(p), num_inference_steps=4, seed=seed)
        ts = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        assert pipe.stats.merged_batches >= 1 and pipe.stats.requests == 3
        assert max(r.batch_requests for r in out) >= 2
        for (p, seed), reply in zip(jobs, out):
            alone = engine.generate(p, [""] * len(p), num_inference_steps=4, seed=seed, progress=False)
            assert reply.seeds == alone.seeds
            for a, b in zip(reply.images, alone.images):
                assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    finally:
        pipe.close()


def test_batch_keeps_different_shapes_apart(engine):
    pipe = BatchingPipeline(engine, max_batch=8, window=0.3)
    try:
        out = {}

        def call(k, **kw):
            out[k] = pipe(prompt=["x"], negative_prompt=[""], num_inference_steps=2, seed=1, **kw)
        ts = [threading.Thread(target=call, args=("a",)),
              threading.Thread(target=call, args=("b",), kwargs={"height": 72}),
              threading.Thread(target=call, args=("c",), kwargs={"guidance_scale": 1.0})]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        assert out["a"].images[0].size == (64, 64) and out["b"].images[0].size == (64, 72)
        assert pipe.stats.batches == 3 and pipe.stats.merged_batches == 0
    finally:
        pipe.close()


def test_few_step_requests_batch_without_guidance_and_keep_eta_apart(engine):
    pipe = BatchingPipeline(engine, max_batch=8, window=0.5)
    calls = []
    real = engine.backend.unet
    engine.backend.unet = lambda x, t, e, **kw: calls.append(x.shape[0]) or real(x, t, e, **kw)
    try:
        out = {}

        def call(k, **kw):
            out[k] = pipe(prompt=["x"], negative_prompt=[""], num_inference_steps=4, seed=1, scheduler="tcd", **kw)
        jobs = {"off1": {"guidance_scale": 1.0}, "off0": {"guidance_scale": 0.5}, "on": {"guidance_scale": 2.0},
                "eta": {"guidance_scale": 1.0, "eta": 0.3}}
        ts = [threading.Thread(target=call, args=(k,), kwargs=kw) for k, kw in jobs.items()]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        # guidance off (1.0 and 0.5) share one call of one UNet batch row each; guided and eta 0.3 run apart
        assert pipe.stats.batches == 3 and out["off1"].batch_requests == 2 and out["on"].batch_requests == 1
        assert sorted(calls) == sorted([2] * 4 + [2] * 4 + [1] * 4)
        alone = engine.generate("x", num_inference_steps=4, seed=1, scheduler="tcd", guidance_scale=1.0, eta=0.3,
                                progress=False)
        assert np.abs(np.asarray(out["eta"].images[0], np.int16) - np.asarray(alone.images[0], np.int16)).max() <= 1
    finally:
        engine.backend.unet = real
        pipe.close()


@pytest.mark.parametrize("kwargs, name", [({"scheduler": "lcm", "num_inference_steps": 51}, "steps"),
                                          ({"scheduler": "pndm", "eta": 0.5}, "eta"),
                                          ({"eta": 0.5}, "eta"),  # the tiny model's own scheduler is PNDM
                                          ({"scheduler": "tcd", "eta": 1.5}, "eta")])
def test_sampler_limits_are_refused_before_batching(engine, kwargs, name):
    pipe = BatchingPipeline(engine, max_batch=2, window=0.0)
    try:
        with pytest.raises(InvalidParameter) as e:
            pipe(prompt=["x"], negative_prompt=[""], **kwargs)
        assert e.value.name == name and pipe.stats.batches == 0
    finally:
        pipe.close()


class SlowEngine:
    class model:
        native_size = 64

    def generate(self, *a, **k):
        time.sleep(1.0)
        raise AssertionError("the caller has left")


def test_timeout():
    pipe = BatchingPipeline(SlowEngine(), Limits(timeout=0.2), max_batch=1)
    try:
        t = time.monotonic()
        with pytest.raises(RequestTimeout):
            pipe(prompt=["a"], negative_prompt=[""], num_inference_steps=1)
        assert time.monotonic() - t < 1.0 and pipe.stats.timeouts == 1
    finally:
        pipe.close()


# -- MII's model server with the fastsd servicer, in process ---------------------------------------
def test_servicer_status_codes(engine):
    import asyncio

    import grpc
    from mii.legacy.client import MIIClient

    from fastsd.serving.replica import make_server, make_servicer
    port = ports.free_port_block(1)
    pipe = BatchingPipeline(engine, Limits(timeout=30), max_batch=4, window=0.0)
    server = make_server(make_servicer(pipe), "127.0.0.1", port, workers=4)
    server.start()
    slow = make_server(make_servicer(BatchingPipeline(SlowEngine(), Limits(timeout=0.2))), "127.0.0.1", port + 1) \
        if ports.port_free(port + 1) else None
    if slow:
        slow.start()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with pytest.raises(SystemExit, match="in use"):  # no silent SO_REUSEPORT sharing
            make_server(make_servicer(pipe), "127.0.0.1", port)
        client = MIIClient("text-to-image", "127.0.0.1", port)
        reply = client.query({"prompt": ["a"], "negative_prompt": [""]}, num_inference_steps=2, seed=3)
        assert len(reply.images) == 1 and reply.nsfw_content_detected == [False]
        for kw, name in [({"num_inference_steps": 5000}, "num_inference_steps"), ({"seed": "abc"}, "seed"),
                         ({"height": 100}, "height"), ({"foo": 1}, "foo")]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                client.query({"prompt": ["a"], "negative_prompt": [""]}, **kw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(name)
        if slow:
            slow_client = MIIClient("text-to-image", "127.0.0.1", port + 1)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                slow_client.query({"prompt": ["a"], "negative_prompt": [""]})
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(client.query({"prompt": ["b"], "negative_prompt": [""]}, num_inference_steps=1).images) == 1
    finally:
        server.stop(0)
        if slow:
            slow.stop(0)
        pipe.close()
        loop.close()


def test_the_request_schema_names_every_scheduler_the_engine_has():
    from fastsd.schedulers import SCHEDULERS
    from fastsd.serving.schema import SCHEDULERS as OFFERED
    assert OFFERED == tuple(SCHEDULERS)
