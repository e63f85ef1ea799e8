"""The shipped few-step LoRA (fastsd/models/loras/lcm-shapes.safetensors, training/train_lcm_lora.py): at 4 LCM
steps and guidance 1 the embedded model draws the colours it is asked for as well as the base model does at 50
steps and guidance 7.5 (fastsd.judge on held-out prompts), and fastsd's fused LoRA with `--scheduler lcm`
matches diffusers' `load_lora_weights` + `LCMScheduler` on the torch and onnxruntime backends."""
import json
from pathlib import Path

import pytest

import fastsd
from fastsd import OptimizeConfig, optimize
from fastsd.judge import judge
from fastsd.loading import load_model
from fastsd.verify import verify

LORAS = Path(fastsd.__file__).parent / "models" / "loras"
LCM = LORAS / "lcm-shapes.safetensors"
MODEL = Path(fastsd.__file__).parent / "models" / "fastsd-shapes"
N = 20  # of the 60 held-out prompts: prompt i with seed i, as training/eval_shapes.py scores them
FEW = dict(scheduler="lcm", num_inference_steps=4, guidance_scale=1.0)
BASE = dict(num_inference_steps=50, guidance_scale=7.5)  # the model's own PNDM, the defaults of generate


def accuracy(engine, prompts, **kw) -> dict:
    out = engine.generate(prompts, seed=list(range(len(prompts))), progress=False, **kw)
    verdicts = [judge(im, p) for im, p in zip(out.images, prompts)]
    return {"shape_colour": sum(v.ok_shape_colour for v in verdicts) / len(verdicts),
            "background": sum(bool(v.ok_background) for v in verdicts) / len(verdicts)}


@pytest.fixture(scope="module")
def prompts():
    return json.loads((MODEL / "eval_prompts.json").read_text())[:N]


@pytest.fixture(scope="module")
def engine():
    return optimize(load_model("fastsd-shapes", safety_checker=False))


def test_shipped_small_and_judged_on_all_60_prompts():
    assert LCM.stat().st_size < 2_000_000
    stats = json.loads((LORAS / "lcm-shapes.json").read_text())
    judged = stats["judge"]
    base, few = judged["base 50 steps pndm guidance 7.5"], judged["lcm-lora 4 steps lcm guidance 1"]
    assert base["n"] == few["n"] == 60
    # the bar: within 5 points of the 50-step base model's shape colour accuracy
    assert few["shape_colour"] >= base["shape_colour"] - 0.05, (few, base)
    assert "lcm-shapes.safetensors" in (LORAS / "README.md").read_text()


def test_four_lcm_steps_keep_the_50_step_colour_accuracy(engine, prompts):
    engine.set_loras([])
    base = accuracy(engine, prompts, **BASE)
    without = accuracy(engine, prompts, **FEW)
    engine.set_loras([(LCM, 1.0)])
    few = accuracy(engine, prompts, **FEW)
    engine.set_loras([])
    assert base["shape_colour"] >= 0.9, base
    for key in ("shape_colour", "background"):
        assert few[key] >= base[key] - 0.05 - 1e-9, (key, few, base)
    assert few["shape_colour"] > without["shape_colour"], (few, without)  # the LoRA, not the sampler, does it


def test_fused_lcm_lora_equals_diffusers(prompts):
    report, *_ = verify(load_model("fastsd-shapes", safety_checker=False), OptimizeConfig(safety_checker=False),
                        prompts=prompts[:2], steps=4, guidance=1.0, scheduler="lcm", loras=[(LCM, 1.0)])
    assert report["passed"], report["images"]
    assert all(r["identical"] or r["psnr_db"] >= 45 for r in report["images"]), report["images"]


def test_lcm_lora_on_onnxruntime_equals_diffusers(prompts, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_model, load_onnx_model, reference_model
    out = tmp_path_factory.mktemp("lcm-onnx") / "shapes"
    export_model(load_model("fastsd-shapes", safety_checker=False), out, components="text_encoder,unet,vae_decoder",
                 progress=False, echo=None)
    onnx_model = load_onnx_model(out)
    report, *_ = verify(reference_model(onnx_model, safety_checker=False),
                        OptimizeConfig(backend="onnxruntime", safety_checker=False), prompts=prompts[:2], steps=4,
                        guidance=1.0, scheduler="lcm", loras=[(LCM, 1.0)], engine_model=onnx_model)
    assert report["passed"], report["images"]
