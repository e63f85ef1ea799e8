"""LoRA on the openvino backend: a LoRA set's fused weights replace the Constant nodes of the export's touched
initializers (backends/onnx_lora.py maps them, as for onnxruntime); the result matches the torch backend's fused
weights and diffusers' load_lora_weights; "none" runs the export's own compiled graphs again."""
import copy
import json

import pytest
import torch

from fastsd import optimize
from fastsd.cli import main
from fastsd.lora_files import random_factors, save_diffusers_layout

pytest.importorskip("openvino")
pytest.importorskip("peft")  # diffusers' load_lora_weights (verify's reference) needs PEFT

UNET = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "ff.net.2")
TEXT = ("q_proj", "out_proj", "fc1")


@pytest.fixture(scope="module")
def lora_file(_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ov-loras")
    return save_diffusers_layout(random_factors(_tiny, rank=4, seed=1, unet_targets=UNET, text_targets=TEXT),
                                 d / "a.safetensors", alpha=2.0)


def _gen(engine):
    return engine.generate(["a red circle"], num_inference_steps=3, seed=0, progress=False).latents


def test_lora_matches_torch_and_none_restores(_tiny, lora_file):
    torch_engine = optimize(copy.deepcopy(_tiny))
    ov_engine = optimize(copy.deepcopy(_tiny), backend="openvino")
    base, base_graphs = _gen(ov_engine), dict(ov_engine.backend.graphs)
    torch_engine.set_loras([(lora_file, 0.8)])
    stats = ov_engine.set_loras([(lora_file, 0.8)])
    assert stats.changed and stats.fused > 0
    got = _gen(ov_engine)
    assert (got - _gen(torch_engine)).abs().max() < 1e-3  # the torch backend's fused weights
    assert (got - base).abs().max() > 0.05  # and the LoRA does change the output
    assert ov_engine.backend.graphs["unet"] is not base_graphs["unet"]
    assert "CACHE_DIR" not in ov_engine.backend.graphs["unet"].properties  # never a cached blob of other weights
    ov_engine.set_loras([])
    assert ov_engine.backend.graphs == base_graphs
    assert torch.equal(_gen(ov_engine), base)
    ov_engine.set_loras([(lora_file, 0.8)])  # the set's compiled graphs again, from the cache
    assert torch.equal(_gen(ov_engine), got)
    assert ov_engine.describe()["lora_sets"]["hits"] == 1


def test_verify_cli_with_lora_against_diffusers(capsys, lora_file, tmp_path):
    report = tmp_path / "v.json"
    rc = main(["verify", "--model", "tiny", "--backend", "openvino", "--lora", f"{lora_file}:0.8", "--steps", "3",
               "--json", str(report), "--quiet"])
    assert rc == 0, capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["passed"] and data["loras"] == ["a.safetensors:0.8"]
    for row in data["images"]:
        assert row["max_abs"] <= 2 and row["latent_cosine"] > 0.99999
