"""Procedural data for fastsd-shapes: flat shapes on flat backgrounds, with the prompt that describes them."""
from __future__ import annotations

import itertools
import random

from PIL import Image, ImageDraw

from fastsd.judge import COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Prompt

SIDE = 64
RADIUS = {"small": (6, 8), "large": (13, 15), None: (6, 15)}


def draw_scene(p: Prompt, rng: random.Random, side: int = SIDE) -> Image.Image:
    """Draw the scene a prompt describes; unnamed size, position or background are drawn at random."""
    bg = p.background or rng.choice([c for c in PALETTE if COLOURS[c] != COLOURS[p.colour]])
    img = Image.new("RGB", (side, side), COLOURS[bg])
    r = rng.uniform(*RADIUS[p.size]) * side / SIDE
    if p.position:
        fx, fy = POSITIONS[p.position]
        cx, cy = fx * side + rng.uniform(-3, 3), fy * side + rng.uniform(-3, 3)
    else:
        cx, cy = rng.uniform(r + 2, side - r - 2), rng.uniform(r + 2, side - r - 2)
    d, fill = ImageDraw.Draw(img), COLOURS[p.colour]
    if p.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif p.shape == "square":
        s = 0.85 * r
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return img


def held_out_triples(seed: int = 1234, fraction: float = 1 / 6) -> set[tuple[str, str, str]]:
    """(colour, shape, position) combinations that never appear in a training prompt."""
    triples = list(itertools.product(PALETTE, SHAPES, POSITIONS))
    rng = random.Random(seed)
    rng.shuffle(triples)
    return set(triples[: round(len(triples) * fraction)])


def random_prompt(rng: random.Random, exclude: set = frozenset()) -> Prompt:
    """A training prompt; never one whose (colour, shape, position) is in exclude."""
    while True:
        colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
        position = rng.choice(list(POSITIONS)) if rng.random() < 0.7 else None
        if (colour, shape, position) in exclude:
            continue
        size = rng.choice(SIZES) if rng.random() < 0.5 else None
        bg = rng.choice([c for c in PALETTE if c != colour]) if rng.random() < 0.85 else None
        return Prompt(colour=colour, shape=shape, size=size, position=position, background=bg)


def prompt_text(p: Prompt, rng: random.Random) -> str:
    """Prompt.text() with the small variation the grammar allows: "in the" or "at the" a position."""
    t = p.text()
    if rng.random() < 0.3:
        t = t.replace(" in the ", " at the ") if " in the " in t else t.replace(" at the ", " in the ")
    return t


def eval_prompts(n: int = 60, seed: int = 4321) -> list[str]:
    """Held-out evaluation prompts: every one names a held-out (colour, shape, position) and a background."""
    rng = random.Random(seed)
    triples = sorted(held_out_triples())
    rng.shuffle(triples)
    out = []
    for i in range(n):
        colour, shape, position = triples[i % len(triples)]
        bg = rng.choice([c for c in PALETTE if c != colour])
        size = rng.choice(SIZES) if rng.random() < 0.5 else None
        out.append(Prompt(colour, shape, size, position, bg).text())
    return out
