"""LoRA: both file layouts read alike, fusing matches diffusers' load_lora_weights, switching restores the
base bit for bit, bad files and scales are clear errors."""
import copy

import pytest
import torch

from fastsd import optimize
from fastsd.errors import FastSDError, InvalidParameter
from fastsd.lora import LoraRef, as_refs, parse_lora_arg, read_lora
from fastsd.lora_files import random_factors, save_diffusers_layout, save_kohya_layout

pytest.importorskip("peft")  # diffusers' load_lora_weights (the reference) needs PEFT

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")  # linear, 1x1 and 3x3 conv layers


@pytest.fixture(scope="module")
def files(tmp_path_factory, _tiny):
    d = tmp_path_factory.mktemp("loras")
    a = random_factors(_tiny, rank=4, seed=1, unet_targets=TARGETS)
    b = random_factors(_tiny, rank=8, seed=2, unet_targets=("to_k", "to_v"))  # touches fewer layers than a
    return {"a": save_diffusers_layout(a, d / "a.safetensors", alpha=2.0),
            "a_kohya": save_kohya_layout(a, d / "a_kohya.safetensors", alpha=2.0),
            "b": save_kohya_layout(b, d / "b.safetensors"),  # alpha = rank
            "unet_only": save_diffusers_layout(random_factors(_tiny, rank=2, seed=3, text_targets=()),
                                               d / "u.safetensors")}


def _gen(engine, steps=3):
    return engine.generate(["a red circle"], num_inference_steps=steps, seed=0, progress=False).latents


def test_parse_lora_arg():
    assert parse_lora_arg("x.safetensors") == LoraRef("x.safetensors", 1.0)
    assert parse_lora_arg("dir/x.safetensors:0.8") == LoraRef("dir/x.safetensors", 0.8)
    assert parse_lora_arg("C:/x.safetensors") == LoraRef("C:/x.safetensors", 1.0)
    assert as_refs([("x", 0.5), "y:2"]) == (LoraRef("x", 0.5), LoraRef("y", 2.0))
    for bad in ("x:abc", "x:99", "x:nan"):
        with pytest.raises(InvalidParameter, match="lora scale"):
            parse_lora_arg(bad)


def test_both_layouts_read_the_same(files, _tiny):
    a, k = read_lora(files["a"]), read_lora(files["a_kohya"], unet_config=_tiny.unet.config)
    assert (a.layout, k.layout) == ("diffusers", "kohya")
    assert set(a.layers) == set(k.layers) and len(a.layers) > 40
    assert {c.split(".")[0] for c in a.layers} == {"unet", "text_encoder"}
    for name, f in a.layers.items():
        g = k.layers[name]
        assert torch.equal(f.down, g.down) and torch.equal(f.up, g.up) and f.alpha == g.alpha == 2.0
    assert read_lora(files["b"]).layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].alpha == 8


@pytest.mark.parametrize("which", ["a", "a_kohya"])
def test_fused_matches_diffusers_load_lora_weights(files, tiny, which):
    """The same LoRA (scale 0.7, alpha 2 of rank 4) through diffusers' PEFT layers and fused by fastsd."""
    path = files[which]
    ref_model = copy.deepcopy(tiny)
    pipe = ref_model.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    ref = pipe(["a red circle"], num_inference_steps=3, generator=[torch.Generator().manual_seed(0)],
               output_type="latent").images
    base = _gen(optimize(copy.deepcopy(tiny)))
    engine = optimize(tiny)
    engine.set_loras([(path, 0.7)])
    got = _gen(engine)
    assert (got - ref).abs().max() < 1e-4  # float rounding of fused vs unfused
    assert (base - ref).abs().max() > 0.05  # and the LoRA does change the output


def test_switch_a_b_none_restores_base_bit_for_bit(files, tiny):
    base_unet = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in tiny.text_encoder.state_dict().items()}
    engine = optimize(tiny)
    before = _gen(engine)
    s = engine.set_loras([(files["a"], 1.0)])
    assert s.changed and s.fused > 40 and s.restored == 0
    with_a = _gen(engine)
    s = engine.set_loras([(files["b"], 0.5)])  # b touches a subset: the rest of a must be restored
    assert s.restored > 0 and s.fused < 40
    engine.set_loras([(files["a"], 1.0)])
    assert torch.equal(_gen(engine), with_a)  # A -> B -> A: A exactly again
    assert engine.set_loras([(files["a"], 1.0)]).changed is False  # same set: nothing to do
    engine.set_loras([])
    assert all(torch.equal(base_unet[k], v) for k, v in tiny.unet.state_dict().items())
    assert all(torch.equal(base_text[k], v) for k, v in tiny.text_encoder.state_dict().items())
    assert torch.equal(_gen(engine), before)
    assert engine.loras.describe()["switches"] == 4


def test_two_loras_sum_before_one_rounding_bf16(files, tiny):
    """A set is fused as base + sum of deltas (one rounding to bf16); the base comes back exactly."""
    engine = optimize(tiny, dtype="bf16")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    w = tiny.unet.get_parameter(name)
    base = w.detach().clone()
    engine.set_loras([(files["a"], 0.5), (files["b"], 0.5)])
    fa = read_lora(files["a"]).layers["unet." + name[:-7]]
    fb = read_lora(files["b"]).layers["unet." + name[:-7]]
    want = (base.float() + 0.5 * fa.alpha / fa.rank * fa.up @ fa.down + 0.5 * fb.alpha / fb.rank * fb.up @ fb.down)
    assert torch.equal(w, want.to(torch.bfloat16)) and w.dtype == torch.bfloat16
    engine.set_loras([])
    assert torch.equal(w, base)


def test_text_encoder_change_clears_embedding_cache(files, tiny):
    engine = optimize(tiny)
    e0 = engine.encode(["a red circle"]).clone()
    engine.set_loras([(files["a"], 1.0)])
    assert not torch.equal(engine.encode(["a red circle"]), e0)
    engine.set_loras([(files["unet_only"], 1.0)])
    assert torch.equal(engine.encode(["a red circle"]), e0)


def test_bad_files_are_clear_errors_and_keep_the_current_set(files, tiny, tmp_path):
    engine = optimize(tiny)
    engine.set_loras([(files["a"], 1.0)])
    with pytest.raises(InvalidParameter, match="lora"):
        engine.set_loras([(tmp_path / "missing.safetensors", 1.0)])
    pickled = tmp_path / "x.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, pickled)
    with pytest.raises(InvalidParameter, match="allow-pickle"):
        engine.set_loras([(pickled, 1.0)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FastSDError, match="cannot read"):
        engine.set_loras([(junk, 1.0)])
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"  # a LoRA for a bigger model: shapes do not fit
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4)},
              str(other))
    with pytest.raises(FastSDError, match="do not fit"):
        engine.set_loras([(other, 1.0)])
    assert [str(r) for r in engine.loras.active] == ["a.safetensors:1"]


def test_pickled_lora_with_allow_pickle(files, tiny, tmp_path):
    from safetensors.torch import load_file
    pickled = tmp_path / "a.bin"
    torch.save(load_file(str(files["a_kohya"])), pickled)  # kohya keeps alpha in tensors, not in metadata
    e1, e2 = optimize(copy.deepcopy(tiny)), optimize(tiny)
    e1.set_loras([(files["a_kohya"], 1.0)])
    e2.set_loras([(pickled, 1.0)], allow_pickle=True)
    assert torch.equal(_gen(e1, 2), _gen(e2, 2))


def test_backend_without_lora_support_is_a_clear_error(tiny):
    from types import SimpleNamespace

    from fastsd.engine import Engine
    engine = Engine(tiny, SimpleNamespace(name="other"), SimpleNamespace(safety_checker=False))  # no lora_weights
    assert engine.set_loras([]) is None
    with pytest.raises(InvalidParameter, match="none on the other backend .*torch, onnxruntime and openvino"):
        engine.set_loras([("x.safetensors", 1.0)])


@pytest.mark.slow
def test_switch_under_compile_reaches_the_compiled_graph(files, tiny):
    """--compile on the CPU with lora_switching: weights stay graph inputs, so an in-place switch after the
    first (compiling) call changes the output with no recompile, and none gives the base output back."""
    ref = optimize(copy.deepcopy(tiny))
    want_base = _gen(ref, 2)
    ref.set_loras([(files["a"], 1.0)])
    want_a = _gen(ref, 2)
    engine = optimize(tiny, compile=True, lora_switching=True)
    base = _gen(engine, 2)
    engine.set_loras([(files["a"], 1.0)])
    with_a = _gen(engine, 2)
    engine.set_loras([])
    again = _gen(engine, 2)
    assert torch.allclose(base, want_base, atol=1e-3) and torch.allclose(with_a, want_a, atol=1e-3)
    assert torch.equal(base, again)


def test_adapters_reach_attention_under_fused_qkv(files, tiny):
    """Fused QKV (on by default on CUDA) makes attention read a fused copy of to_q/to_k/to_v: LoRA deltas
    written into the projections must reach it. Forced on the CPU here; `b` adapts only to_k/to_v, so with
    the fused copy left stale it changed nothing at all."""
    from fastsd import kernels

    plain = optimize(copy.deepcopy(tiny))
    fused = optimize(tiny, fused_ops=True)
    assert kernels.fuse_projections(fused.backend.unet_module) == (True, "fused")
    for loras in ([(files["b"], 1.0)], [(files["a"], 0.7), (files["b"], 0.5)], []):
        plain.set_loras(loras)
        fused.set_loras(loras)
        want, got = _gen(plain), _gen(fused)
        assert (got - want).abs().max() < 1e-4, loras
    plain.set_loras([])
    base = _gen(plain)
    fused.set_loras([(files["b"], 1.0)])
    assert (_gen(fused) - base).abs().max() > 0.05  # the attention-only adapter changes the output


# the layers diffusers' LCM-LoRA script adapts (training/train_lcm_lora.py): linear, 1x1/3x3 convs, time embedding
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@pytest.mark.parametrize("keys", ["peft", "mixed"])
def test_peft_trained_adapter_fuses_as_peft_merges_it(tiny, tmp_path, keys):
    """A LoRA trained with PEFT on the UNet (LCM-LoRA targets) and saved by diffusers' save_lora_weights: fastsd's
    fused weights equal PEFT's own merge of the trained layers, layer by layer. "peft" keys are what
    get_peft_model_state_dict gives (training/train_lcm_lora.py writes these), with PEFT's config (alpha 2 of rank 4)
    in the file's metadata: diffusers' load_lora_weights + fuse_lora gives the same weights. "mixed" is that state dict passed through convert_state_dict_to_diffusers, which renames
    only the attention projections (to_k.lora.down) and leaves the rest (proj_in.lora_A): fastsd still fuses every
    layer, while diffusers 0.42's loader keeps only the keys of the first key's format (PEFT warns of the rest)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from fastsd.lora import LoraSwitcher, ModuleWeights
    trained = copy.deepcopy(tiny.unet)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=LCM_TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = get_peft_model_state_dict(trained)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), weight_name="l.safetensors", safe_serialization=True,
                                              unet_lora_layers=sd if keys == "peft" else
                                              convert_state_dict_to_diffusers(sd),
                                              unet_lora_adapter_metadata=trained.peft_config["default"].to_dict())
    adapted = [n for n, m in trained.named_modules() if isinstance(m, LoraLayer)]
    kinds = {type(m.get_base_layer()).__name__ for n, m in trained.named_modules() if isinstance(m, LoraLayer)}
    assert kinds == {"Linear", "Conv2d"} and any(n.endswith("time_emb_proj") for n in adapted)
    for m in trained.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    merged = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}

    base = {n: p.detach().clone() for n, p in tiny.unet.named_parameters()}
    ref = copy.deepcopy(tiny).to_pipeline()  # copied before fastsd fuses into `tiny` in place
    LoraSwitcher(ModuleWeights({"unet": tiny.unet, "text_encoder": tiny.text_encoder}),
                 unet_config=tiny.unet.config).set([(tmp_path / "l.safetensors", 1.0)])
    fused = dict(tiny.unet.named_parameters())
    changed = {n.rsplit(".", 1)[0] for n in base if not torch.equal(base[n], fused[n])}
    assert changed == set(adapted)  # every adapted layer's weight moved, and nothing else
    assert max((fused[n] - merged[n]).abs().max().item() for n in base) < 1e-6
    if keys == "peft":
        ref.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
        ref.fuse_lora()
        ref.unload_lora_weights()  # keeps the fused weights, drops PEFT's layers (plain parameter names again)
        theirs = dict(ref.unet.named_parameters())
        assert max((fused[n] - theirs[n]).abs().max().item() for n in base) < 1e-6
