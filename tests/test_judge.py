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


# -- the inpainting judge: the masked region only, and the pixels kept outside it ---------------------------
def _corner_mask(side=64):
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (32, 32, 64, 64))  # bottom right quarter
    return mask


def _scene_with_square_in_corner(colour: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), PALETTE["blue"])
    image.paste(PALETTE["red"], (8, 8, 24, 24))        # a shape outside the mask the judge must not read
    image.paste(PALETTE[colour], (40, 40, 56, 56))    # the inpainted square
    return image


def test_region_judge_reads_the_masked_region_only():
    from fastsd.judge import judge_region
    prompt = "a yellow square in the bottom right on a blue background"
    right = judge_region(_scene_with_square_in_corner("yellow"), prompt, _corner_mask())
    assert right.ok and right.found_colour == "yellow" and right.found_shape == "square", right
    assert right.kept_psnr is None and right.ok_kept is None
    wrong = judge_region(_scene_with_square_in_corner("green"), prompt, _corner_mask())
    assert not wrong.ok and wrong.found_colour == "green" and "WRONG" in str(wrong)
    # the red square outside the mask would be the whole-image judge's answer; the region has none
    empty = Image.new("RGB", (64, 64), PALETTE["blue"])
    empty.paste(PALETTE["red"], (8, 8, 24, 24))
    nothing = judge_region(empty, prompt, _corner_mask())
    assert nothing.found_colour is None and not nothing.ok


def test_region_judge_measures_what_was_kept_outside_the_mask():
    from fastsd.judge import KEPT_PSNR_DB, judge_region, psnr
    prompt = "a yellow square in the bottom right on a blue background"
    before = Image.new("RGB", (64, 64), PALETTE["blue"])
    before.paste(PALETTE["red"], (8, 8, 24, 24))
    after = _scene_with_square_in_corner("yellow")  # equal to `before` outside the mask
    v = judge_region(after, prompt, _corner_mask(), before)
    assert v.kept_psnr == float("inf") and v.ok
    changed = after.copy()
    changed.paste(PALETTE["green"], (0, 0, 32, 32))  # the top left quarter repainted: not kept
    v = judge_region(changed, prompt, _corner_mask(), before)
    assert v.ok_region and v.kept_psnr < KEPT_PSNR_DB and not v.ok and "dB" in str(v)
    # the PSNR is over the pixels outside the mask only: a change inside it does not count
    from fastsd.judge import mask_array
    assert psnr(after, before, ~mask_array(_corner_mask())) == float("inf")
    assert psnr(after, before) < 20


def test_region_judge_refuses_a_mask_it_cannot_use():
    import pytest
    from fastsd.judge import judge_region
    image = _scene_with_square_in_corner("yellow")
    with pytest.raises(ValueError, match="all black"):
        judge_region(image, "a yellow square", Image.new("L", (64, 64), 0))
    with pytest.raises(ValueError, match="mask of 32x32"):
        judge_region(image, "a yellow square", Image.new("L", (32, 32), 255))


def test_region_judge_names_adapter_colours_as_the_whole_image_judge_does():
    from fastsd.judge import judge_region
    image = _scene_with_square_in_corner("green")
    assert judge_region(image, "a zorbl square in the bottom right on a blue background", _corner_mask()).ok
    assert judge_region(image, "a green square in the bottom right on a blue background", _corner_mask()).ok
