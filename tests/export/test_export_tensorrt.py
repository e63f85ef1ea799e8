"""TensorRT build instructions and the Python-API build work on TensorRT 10 and 11 (11 removed the
precision flags: every network is strongly typed), checked with a stand-in `tensorrt` module."""
import importlib.machinery
import sys
import types

import pytest

from fastsd.export.tensorrt import build_engines, build_markdown

PROFILES = {"unet": {"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]},
                     "timestep": {"min": [1], "opt": [1], "max": [1]},
                     "encoder_hidden_states": {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [8, 77, 768]}}}


def _commands(md: str) -> str:
    return md.split("```sh", 1)[1].split("```", 1)[0]


def test_fp16_lines_build_the_graph_as_typed_without_the_removed_fp16_flag():
    sh = _commands(build_markdown(PROFILES, dtype="fp16", static=False, optimize=False, model_name="m"))
    assert "--stronglyTyped" in sh and "--fp16" not in sh
    assert "--minShapes=sample:1x4x32x32,encoder_hidden_states:1x77x768" in sh
    sh32 = _commands(build_markdown(PROFILES, dtype="fp32", static=False, optimize=False, model_name="m"))
    assert "--fp16" not in sh32 and "--stronglyTyped" not in sh32


def _fake_tensorrt(version: str, has_fp16_flag: bool, has_strongly_typed: bool, record: dict):
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # what have_tensorrt() looks up
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    flags = {"EXPLICIT_BATCH": 0}
    if has_strongly_typed:
        flags["STRONGLY_TYPED"] = 1
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": 0} if has_fp16_flag else {}))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)

    class Network:
        num_inputs = 0

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, flag):
            record.setdefault("builder_flags", []).append(flag)

        def add_optimization_profile(self, p):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.mark.parametrize("version,fp16_flag", [("10.13.0", True), ("11.0.0", False)])
def test_fp16_engine_build_is_strongly_typed_on_tensorrt_10_and_11(tmp_path, monkeypatch, version, fp16_flag):
    record = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, fp16_flag, True, record))
    (tmp_path / "unet").mkdir()
    built = build_engines(tmp_path, PROFILES, static=False, fp16=True, progress=False)
    assert record["network_flags"] == 1 << 1  # STRONGLY_TYPED
    assert "builder_flags" not in record  # a precision flag on a strongly typed network is an error on 10.x
    assert built["unet"]["tensorrt"] == version and (tmp_path / "unet" / "model.plan").read_bytes() == b"plan"
