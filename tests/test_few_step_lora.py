"""The shipped few-step adapter (fastsd/models/loras/lcm-shapes.safetensors) gives real images in 4 steps: on the
judge's held-out prompts fastsd draws the asked shape colour with it at 4 TCD steps, guidance 1.5, and mostly
not without it (the base model needs ~50 steps). Its run's figures on all 60 prompts are in lcm-shapes.json."""
import json
from pathlib import Path

import pytest

import fastsd
from fastsd import optimize
from fastsd.judge import judge
from fastsd.loading import load_model

LORAS = Path(fastsd.__file__).parent / "models" / "loras"
RECIPE = dict(scheduler="tcd", num_inference_steps=4, guidance_scale=1.5)
FOUR_STEPS = "lcm-lora 4 steps tcd guidance 1.5"
BASE = "base 50 steps pndm guidance 7.5"


@pytest.fixture(scope="module")
def engine():
    return optimize(load_model("fastsd-shapes", safety_checker=False))


def test_shipped_adapter_meets_the_bar_and_is_documented():
    assert (LORAS / "lcm-shapes.safetensors").stat().st_size < 2_500_000
    judged = json.loads((LORAS / "lcm-shapes.json").read_text())["judge"]
    assert judged[FOUR_STEPS]["n"] == judged[BASE]["n"] == 60
    assert judged[FOUR_STEPS]["shape_colour"] >= judged[BASE]["shape_colour"] - 0.05, judged[FOUR_STEPS]
    assert "lcm-shapes.safetensors" in (LORAS / "README.md").read_text()


def test_four_steps_draw_the_asked_colour_with_the_adapter_only(engine):
    prompts = json.loads((Path(fastsd.__file__).parent / "models" / "fastsd-shapes" / "eval_prompts.json")
                         .read_text())[:8]
    ok = {}
    for name, loras in (("without", []), ("with", [(LORAS / "lcm-shapes.safetensors", 1.0)])):
        engine.set_loras(loras)
        out = engine.generate(prompts, seed=list(range(8)), progress=False, **RECIPE)
        ok[name] = [judge(im, p).ok_shape_colour for im, p in zip(out.images, prompts)]
    engine.set_loras([])
    assert sum(ok["with"]) >= 6 and sum(ok["without"]) <= 2, ok
