"""The APIs' answers when the deployment refuses or fails (429 busy, 503 unavailable, 504 timeout), with
a stand-in deployment client (no model): the `openai` client raises its own classes and honours
Retry-After, A1111 callers get the status in FastAPI's shape. And the translation tables, unit by unit."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastsd.serving import a1111_api, a1111_fields, openai_api  # noqa: E402
from fastsd.serving.errors import DeploymentError  # noqa: E402
from fastsd.serving.gateway import ApiError, Gateway  # noqa: E402
from fastsd.serving.ports import free_port_block  # noqa: E402
from fastsd.serving.request import Limits  # noqa: E402
from fastsd.serving.spec import DeploymentSpec  # noqa: E402


class Refusing:
    """A deployment client whose every answer is the gRPC status named by the prompt."""
    calls = 0

    def generate(self, prompts, negatives=None, **kw):
        Refusing.calls += 1
        raise DeploymentError(prompts[0], f"the deployment said {prompts[0]}")


@pytest.fixture(scope="module")
def url():
    app = fastapi.FastAPI()

    @app.middleware("http")
    async def ids(request, call_next):  # what the REST gateway's middleware gives every request
        request.state.request_id, request.state.info = "rid-1", {}
        return await call_next(request)
    spec = DeploymentSpec(name="fake", model="fastsd-shapes", limits=Limits())
    gw = Gateway(spec, Refusing(), ThreadPoolExecutor(2), token=None)
    openai_api.mount(app, gw)
    a1111_api.mount(app, gw)
    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


@pytest.mark.parametrize("code, status, error", [
    ("RESOURCE_EXHAUSTED", 429, "RateLimitError"), ("UNAVAILABLE", 503, "InternalServerError"),
    ("DEADLINE_EXCEEDED", 504, "InternalServerError"), ("INVALID_ARGUMENT", 400, "BadRequestError")])
def test_deployment_refusals_in_each_apis_shape(url, code, status, error):
    c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=1)
    before = Refusing.calls
    with pytest.raises(getattr(openai, error)) as e:
        c.images.generate(prompt=code, size="64x64")
    assert e.value.status_code == status and set(e.value.body) == {"message", "type", "param", "code"}
    if status in (429, 503):
        assert e.value.response.headers["retry-after"] == "1"
        assert Refusing.calls - before == 2  # the client retried once by itself, as told
    r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": code, "width": 64, "height": 64})
    assert r.status_code == (422 if status == 400 else status) and code in r.json()["detail"]


def test_a1111_names():
    assert a1111_fields.sampler("Euler a") == ("Euler a", "euler-ancestral")
    assert a1111_fields.sampler("k_dpmpp_2m") == ("DPM++ 2M", "dpm++")
    assert a1111_fields.sampler("plms") == ("PLMS", "pndm")
    with pytest.raises(ApiError, match="allowed: Euler a, Euler, LMS, DPM"):
        a1111_fields.sampler("DPM++ 2M Karras")
    assert a1111_fields.schedule_type("automatic") == a1111_fields.schedule_type("Automatic") == "Automatic"
    assert a1111_fields.loras_in("a cat <lora:speckle:0.8> <LORA:b> x") == ("a cat   x", "speckle:0.8,b:1")
    assert a1111_fields.loras_in("a cat") == ("a cat", None)


def test_a1111_translation():
    job = a1111_fields.translate({"prompt": "a", "seed": -1, "batch_size": 2, "n_iter": 3, "eta": 1.0,
                                  "sampler_name": "DDIM", "subseed": 5, "unknown_field": [1]}, Limits(), "m", False)
    p = job.fields["parameters"]
    assert p["num_images_per_prompt"] == 6 and 0 <= p["seed"] < 2**31 and p["scheduler"] == "ddim"
    assert job.ignored == {"eta": 1.0}  # DDIM runs with eta 0
    assert a1111_fields.translate({"prompt": "a", "eta": 1.0, "sampler_name": "Euler a"}, Limits(), "m",
                                  False).ignored == {}
    with pytest.raises(ApiError) as e:
        a1111_fields.translate({"prompt": "a", "styles": ["cinematic"]}, Limits(), "m", False)
    assert e.value.param == "styles" and e.value.status == 422
