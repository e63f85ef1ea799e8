"""LoRA on the onnxruntime backend: fused weights replace the export's initializers in new sessions; the
result matches torch's fused weights and diffusers' load_lora_weights; switching back uses the export's own
sessions; an export whose weights were fused away is refused by name."""
import copy
import json

import numpy as np
import pytest
import torch

from fastsd import optimize
from fastsd.cli import main
from fastsd.export import export_model, load_onnx_model
from fastsd.lora import LoraError
from fastsd.lora_files import random_factors, save_kohya_layout

pytest.importorskip("onnxruntime")
pytest.importorskip("peft")  # diffusers' load_lora_weights (verify's reference) needs PEFT



@pytest.fixture(scope="module")
def export_dir(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-lora") / "tiny-onnx"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    return out


@pytest.fixture(scope="module")
def files(_tiny, tmp_path_factory, every_layout_lora):
    d = tmp_path_factory.mktemp("ort-loras")
    return {"a": every_layout_lora,
            "b": save_kohya_layout(random_factors(_tiny, rank=8, seed=2, unet_targets=("to_k",)), d / "b.safetensors")}


def _gen(engine):
    return engine.generate(["a red circle"], num_inference_steps=3, seed=0, progress=False).latents


def test_switch_a_b_none_matches_torch_and_fresh_sessions(export_dir, files, _tiny):
    torch_engine = optimize(copy.deepcopy(_tiny))
    ort_engine = optimize(load_onnx_model(export_dir), backend="onnxruntime")
    base = _gen(ort_engine)
    base_sessions = dict(ort_engine.backend.graphs)
    seen = {}
    for name, scale in (("a", 0.8), ("b", 1.0), ("a", 0.8)):
        torch_engine.set_loras([(files[name], scale)])
        s = ort_engine.set_loras([(files[name], scale)])
        assert s.changed
        got = _gen(ort_engine)
        assert (got - _gen(torch_engine)).abs().max() < 1e-3  # the torch backend's fused weights
        assert (got - base).abs().max() > 0.05  # and the LoRA does change the output
        seen.setdefault(name, got)
        assert torch.equal(got, seen[name])  # A -> B -> A: A exactly again (its cached sessions)
    fresh = optimize(load_onnx_model(export_dir), backend="onnxruntime")
    fresh.set_loras([(files["a"], 0.8)])
    assert torch.equal(seen["a"], _gen(fresh))  # a switched engine = one that started with this set
    cache = ort_engine.backend.lora_sessions.describe()
    assert cache["sessions_made"] == 2 and cache["hits"] == 1
    ort_engine.set_loras([])
    assert ort_engine.backend.graphs == base_sessions  # none: the export's own sessions
    assert torch.equal(_gen(ort_engine), base)


def test_session_cache_is_bounded(export_dir, files):
    engine = optimize(load_onnx_model(export_dir), backend="onnxruntime")
    engine.backend.LORA_SESSION_SETS = 1
    for scale in (0.5, 1.0, 0.5):
        engine.set_loras([(files["b"], scale)])
    cache = engine.backend.lora_sessions.describe()
    assert cache["cached_sets"] == 1 and cache["sessions_made"] == 3 and cache["hits"] == 0


def test_verify_cli_with_lora_against_diffusers(capsys, export_dir, files, tmp_path):
    """fastsd verify --backend onnxruntime --lora FILE:0.8: diffusers' load_lora_weights FP32 is the reference."""
    report = tmp_path / "v.json"
    code = main(["verify", "--backend", "onnxruntime", "--model", str(export_dir), "--steps", "4",
                 "--lora", f"{files['a']}:0.8", "--json", str(report), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    data = json.loads(report.read_text())
    assert data["passed"] and data["loras"] == ["a.safetensors:0.8"]
    for row in data["images"]:
        assert row["max_abs"] <= 2 and row["latent_cosine"] > 0.99999


def test_generate_cli_with_lora(capsys, export_dir, files, tmp_path):
    img = tmp_path / "img.png"
    code = main(["generate", "a cat", "--backend", "onnxruntime", "--model", str(export_dir), "--steps", "2",
                 "--lora", f"{files['b']}:0.5", "--out", str(img)])
    assert code == 0, capsys.readouterr().err
    assert img.is_file()


def _refused(folder, lora):
    engine = optimize(load_onnx_model(folder), backend="onnxruntime")
    before = _gen(engine)
    with pytest.raises(LoraError, match=r"unet\.down_blocks\.0\..*attn1\.to_k\.weight.*--optimize") as e:
        engine.set_loras([(lora, 1.0)])
    assert "\n" not in str(e.value)
    assert engine.loras.active == () and torch.equal(_gen(engine), before)  # nothing changed


def test_weight_without_an_initializer_of_its_own_is_refused(export_dir, files, tmp_path):
    """A graph where a fusion took over one projection (here: its MatMul renamed, as onnxruntime's fusions
    name their nodes): the LoRA is refused naming that weight, not applied without it."""
    import shutil

    import onnx
    folder = tmp_path / "fused"
    shutil.copytree(export_dir, folder)
    path = folder / "unet" / "model.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name.endswith("down_blocks.0/attentions.0/transformer_blocks.0/"
                                                               "attn1/to_k/MatMul"))
    node.name = "FusedAttention_0"
    onnx.save(model, str(path))
    _refused(folder, files["b"])


@pytest.mark.slow
def test_optimize_export_is_refused(_tiny, files, tmp_path):
    """--optimize packs the attention projections into one weight: no initializer per to_k to replace."""
    out = tmp_path / "opt"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", optimize=True, progress=False, echo=None)
    _refused(out, files["b"])


def test_initializer_map_layouts(export_dir, _tiny):
    """Each touched torch weight maps to its initializer, transposed where the exporter stored W^T."""
    from fastsd.backends.onnx_lora import InitializerMap
    m = InitializerMap("unet", export_dir / "unet" / "model.onnx")
    for module, transposed in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", True),
                               ("down_blocks.0.resnets.0.time_emb_proj", False), ("conv_in", False)):
        name = m.resolve(module)
        assert name == f"unet.{module}.weight" and m.entry(name).transposed is transposed
        want = _tiny.unet.get_submodule(module).weight.detach()
        assert torch.equal(m.base(name), want)
        init, arr = m.to_initializer(name, want)
        stored = want.numpy().T if transposed else want.numpy()
        assert init == m.entry(name).initializer and np.array_equal(arr, stored)
    assert m.resolve("no_such_block.to_q") is None
