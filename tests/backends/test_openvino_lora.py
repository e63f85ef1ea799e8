"""LoRA on the openvino backend: a LoRA set's fused weights replace the Constant nodes of the export's touched
initializers (backends/onnx_lora.py maps them, as for onnxruntime); the result matches the torch backend's fused
weights and diffusers' load_lora_weights; "none" runs the export's own compiled graphs again."""
import copy
import json

import pytest
import torch

from fastsd import optimize
from fastsd.cli import main

pytest.importorskip("openvino")
pytest.importorskip("peft")  # diffusers' load_lora_weights (verify's reference) needs PEFT


def _gen(engine):
    return engine.generate(["a red circle"], num_inference_steps=3, seed=0, progress=False).latents


def test_lora_matches_torch_and_none_restores(_tiny, every_layout_lora):
    torch_engine = optimize(copy.deepcopy(_tiny))
    ov_engine = optimize(copy.deepcopy(_tiny), backend="openvino")
    base, base_graphs = _gen(ov_engine), dict(ov_engine.backend.graphs)
    torch_engine.set_loras([(every_layout_lora, 0.8)])
    stats = ov_engine.set_loras([(every_layout_lora, 0.8)])
    assert stats.changed and stats.fused > 0
    got = _gen(ov_engine)
    assert (got - _gen(torch_engine)).abs().max() < 1e-3  # the torch backend's fused weights
    assert (got - base).abs().max() > 0.05  # and the LoRA does change the output
    assert ov_engine.backend.graphs["unet"] is not base_graphs["unet"]
    assert "CACHE_DIR" not in ov_engine.backend.graphs["unet"].properties  # never a cached blob of other weights
    ov_engine.set_loras([])
    assert ov_engine.backend.graphs == base_graphs
    assert torch.equal(_gen(ov_engine), base)
    ov_engine.set_loras([(every_layout_lora, 0.8)])  # the set's compiled graphs again, from the cache
    assert torch.equal(_gen(ov_engine), got)
    assert ov_engine.describe()["lora_sets"]["hits"] == 1


def test_verify_cli_with_lora_against_diffusers(capsys, every_layout_lora, tmp_path):
    report = tmp_path / "v.json"
    rc = main(["verify", "--model", "tiny", "--backend", "openvino", "--lora", f"{every_layout_lora}:0.8",
               "--steps", "3", "--json", str(report), "--quiet"])
    assert rc == 0, capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["passed"] and data["loras"] == ["a.safetensors:0.8"]
    for row in data["images"]:
        assert row["max_abs"] <= 2 and row["latent_cosine"] > 0.99999
