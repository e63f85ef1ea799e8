"""Processes that run no model import neither torch nor diffusers nor MII's package (issue 24, item 11):
the supervisor, the load balancer, the REST gateway, the metrics exporter, `fastsd status`/`stop`, the
deployment client and the Ray ingress. Each module is imported in a fresh interpreter and its import set checked; the live
deployment tests (test_serving_hardening.py) check their resident memory. MII's message classes, loaded
without MII's package (proto.py), are MII's own, and its constants agree."""
import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "mii", "deepspeed")
LIGHT = ["fastsd.serving.supervisor", "fastsd.serving.balancer", "fastsd.serving.rest", "fastsd.serving.gateway",
         "fastsd.serving.metrics", "fastsd.serving.status", "fastsd.serving.deploy", "fastsd.serving.client",
         "fastsd.serving.control", "fastsd.serving.admission", "fastsd.serving.slowloris",
         "fastsd.serving.ray.ingress", "fastsd.serving.ray.config"]  # the Ray ingress replica: no engine


def imported_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_serving_processes_import_no_model_library():
    """Every light module, imported one after the other in one interpreter, the heavy ones checked after each."""
    code = "import importlib, sys\nbad = {}\n" + "".join(
        f"importlib.import_module({m!r}); bad[{m!r}] = sorted({{k.split('.')[0] for k in sys.modules}} & {set(HEAVY)!r})\n"
        for m in LIGHT) + "assert not any(bad.values()), bad"
    assert not imported_after(code) & set(HEAVY)


def test_what_those_processes_run_imports_no_model_library():
    """Their start-up work: MII's messages and service (balancer, client), grpc health, the REST app."""
    code = """
from fastsd.serving import proto
from fastsd.serving.rest import create_app
import grpc, fastapi, uvicorn, prometheus_client
from grpc_health.v1 import health_pb2_grpc
assert len(proto.methods()) >= 12 and proto.messages().Text2ImageRequest(prompt=["a"]).prompt == ["a"]
"""
    assert not imported_after(code) & set(HEAVY)


def test_proto_messages_are_miis_own():
    import mii.legacy.constants as constants
    from mii.legacy.grpc_related.proto import legacymodelresponse_pb2 as pb2

    from fastsd.serving import proto
    assert proto.messages().Text2ImageRequest is pb2.Text2ImageRequest
    assert proto.GRPC_MAX_MSG_SIZE == constants.GRPC_MAX_MSG_SIZE
    assert proto.TERMINATE == constants.TERMINATE_METHOD
    assert {"Txt2ImgReply", "InpaintingReply", "Terminate"} <= set(proto.methods())


def test_package_names_stay_functions_after_their_submodules_load():
    code = """
import fastsd, sys, types
assert "torch" not in sys.modules
import fastsd.optimize, fastsd.accelerate
from fastsd import optimize, accelerate, Engine, load_model
assert callable(optimize) and not isinstance(optimize, types.ModuleType)
assert not isinstance(fastsd.accelerate, types.ModuleType) and fastsd.optimize is optimize
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
