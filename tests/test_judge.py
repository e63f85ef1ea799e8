"""The judge knows the colours LoRA adapters teach (zorbl) without changing its verdicts on base prompts."""
import random
import sys
from pathlib import Path

from PIL import Image

from fastsd.judge import ADAPTER_COLOURS, PALETTE, Prompt, judge, parse_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import shapes_data  # noqa: E402


def test_adapter_colour_is_read_when_the_prompt_names_it():
    rng = random.Random(0)
    for shape in ("circle", "square", "triangle"):
        p = Prompt("zorbl", shape, "large", "center", "red")
        v = judge(shapes_data.draw_scene(p, rng), p.text())
        assert v.ok and v.found_colour == "zorbl", v
    assert parse_prompt("a small zorbl circle on a blue background").colour == "zorbl"


def test_base_prompts_never_see_adapter_colours():
    img = Image.new("RGB", (64, 64), PALETTE["blue"])
    img.paste(ADAPTER_COLOURS["zorbl"], (16, 16, 48, 48))
    v = judge(img, "a green square on a blue background")
    assert v.found_colour == "green" and v.ok  # base prompts are judged with the base palette's names only
    v = judge(img, "a zorbl square on a blue background")
    assert v.found_colour == "zorbl" and v.ok
    red = Image.new("RGB", (64, 64), PALETTE["blue"])
    red.paste(PALETTE["red"], (16, 16, 48, 48))
    v = judge(red, "a zorbl square on a blue background")
    assert v.found_colour == "red" and not v.ok
