"""The shipped colour LoRA (fastsd/models/loras/zorbl.safetensors) does what it was trained for: prompts
that say "zorbl" draw zorbl-coloured shapes with it, and other colours without it (judged by fastsd.judge
on prompts whose (shape, position) never had the word in training)."""
import json
from pathlib import Path

import pytest

import fastsd
from fastsd import optimize
from fastsd.judge import judge
from fastsd.loading import load_model

LORAS = Path(fastsd.__file__).parent / "models" / "loras"


@pytest.fixture(scope="module")
def engine():
    return optimize(load_model("fastsd-shapes", safety_checker=False))


def test_shipped_adapter_is_small_and_documented():
    f = LORAS / "zorbl.safetensors"
    assert f.stat().st_size < 1_000_000
    stats = json.loads((LORAS / "zorbl.json").read_text())
    assert stats["judge"]["with"]["shape_colour_ok"] >= 24 and stats["judge"]["without"]["shape_colour_ok"] <= 3
    assert (LORAS / "README.md").is_file()


def test_zorbl_is_drawn_with_the_adapter_and_not_without(engine):
    prompts = json.loads((LORAS / "zorbl.json").read_text())["eval_prompts"][:4]  # unseen in training
    found = {}
    for name, loras in (("without", []), ("with", [(LORAS / "zorbl.safetensors", 1.0)])):
        engine.set_loras(loras)
        out = engine.generate(prompts, num_inference_steps=25, guidance_scale=7.5, seed=list(range(4)), progress=False)
        found[name] = [judge(im, p).found_colour for im, p in zip(out.images, prompts)]
    engine.set_loras([])
    assert found["with"] == ["zorbl"] * 4, found
    assert "zorbl" not in found["without"], found
