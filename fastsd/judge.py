"""A model-free judge for the fastsd-shapes model: does an image show what its prompt asked for?

Prompts follow one small grammar, e.g. "a small green square in the top left on a red background".
The judge reads the image with pixel statistics only: every pixel is snapped to the nearest palette
colour, the background is the majority colour of the border ring, the shape is the majority of the
remaining pixels, and its position is their centroid. Needs only numpy and Pillow.

For inpainting, `judge_region` reads only the masked region (white = repainted) and measures the PSNR of
the pixels outside the mask against the input image.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
# Colour words the base model was never taught; LoRA adapters teach them (training/train_colour_lora.py).
# They join the palette only for a prompt that names one, so the base model's verdicts stay as published.
# A word names a colour the model can draw: fastsd-shapes' VAE decodes only its palette's colours (a teal
# (20, 200, 200) came back purple on red and blue on white), and a LoRA on the UNet and text encoder cannot
# change the decoder. The base model never draws green for "zorbl" (0 of 30 held-out prompts).
ADAPTER_COLOURS: dict[str, tuple[int, int, int]] = {
    "zorbl": PALETTE["green"],
}
COLOURS = {**PALETTE, **ADAPTER_COLOURS}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Position name -> centre of the shape as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
    "top": (0.5, 0.25), "bottom": (0.5, 0.75), "left": (0.25, 0.5), "right": (0.75, 0.5),
}
MIN_SHAPE_FRACTION = 0.01  # below this share of non-background pixels the judge finds no shape

_C = "|".join(COLOURS)
_P = "|".join(sorted(POSITIONS, key=len, reverse=True))
_PROMPT = re.compile(
    rf"^an? (?:(?P<size>small|large) )?(?P<colour>{_C}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?:in|at) the (?P<position>{_P}))?(?: on an? (?P<background>{_C}) background)?$")


@dataclass
class Prompt:
    colour: str
    shape: str
    size: Optional[str] = None
    position: Optional[str] = None
    background: Optional[str] = None

    def text(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.colour, self.shape]
        if self.position:
            words.append(("in the " if " " in self.position else "at the ") + self.position)
        if self.background:
            words.append(f"on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background")
        return " ".join(words)


def parse_prompt(prompt: str) -> Prompt:
    m = _PROMPT.match(" ".join(prompt.lower().replace(",", " ").split()))
    if m is None:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    return Prompt(**m.groupdict())


@dataclass
class Verdict:
    asked: Prompt
    found_background: str
    found_colour: Optional[str]        # None: no shape found
    found_shape: Optional[str]         # from the fill ratio of the shape's bounding box
    found_position: Optional[str]      # nearest entry of POSITIONS to the shape's centroid
    ok_shape_colour: bool
    ok_background: Optional[bool]      # None when the prompt names no background
    ok_position: Optional[bool]        # None when the prompt names no position

    @property
    def ok(self) -> bool:
        return self.ok_shape_colour and self.ok_background is not False

    def __str__(self) -> str:
        """One line a person reads beside the file name, e.g. "ok: red shape (asked red), blue background"."""
        def mark(ok):
            return " WRONG" if ok is False else ""
        parts = [f"{self.found_colour or 'no'} shape (asked {self.asked.colour}){mark(self.ok_shape_colour)}"]
        if self.asked.background:
            parts.append(f"{self.found_background} background (asked {self.asked.background}){mark(self.ok_background)}")
        if self.found_shape:
            parts.append(f"looks like a {self.found_shape} at the {self.found_position}")
        return ("ok: " if self.ok else "WRONG: ") + ", ".join(parts)


def snap(image: Image.Image, palette: dict = PALETTE) -> np.ndarray:
    """Index into `palette` of the nearest palette colour for every pixel, shape (H, W)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    pal = np.array(list(palette.values()), dtype=np.float32)
    return ((rgb[:, :, None, :] - pal) ** 2).sum(-1).argmin(-1)


def palette_for(asked: Prompt) -> dict[str, tuple[int, int, int]]:
    """The base palette, with the adapter colour words the prompt names."""
    adapter = {c: ADAPTER_COLOURS[c] for c in (asked.colour, asked.background) if c in ADAPTER_COLOURS}
    # in a prompt that says zorbl, zorbl is the name of its colour (the base word for the same colour steps aside)
    palette = {n: rgb for n, rgb in PALETTE.items() if rgb not in adapter.values()}
    palette.update(adapter)
    return palette


def judge(image: Image.Image, prompt: str) -> Verdict:
    asked = parse_prompt(prompt)
    palette = palette_for(asked)
    names = list(palette)
    idx = snap(image, palette)
    h, w = idx.shape
    ring = np.concatenate([idx[:2].ravel(), idx[-2:].ravel(), idx[:, :2].ravel(), idx[:, -2:].ravel()])
    bg = int(np.bincount(ring, minlength=len(names)).argmax())
    fg_mask = idx != bg
    colour = shape = position = None
    if fg_mask.mean() >= MIN_SHAPE_FRACTION:
        counts = np.bincount(idx[fg_mask], minlength=len(names))
        colour = names[int(counts.argmax())]
        ys, xs = np.nonzero(idx == counts.argmax())
        cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return Verdict(
        asked=asked, found_background=names[bg], found_colour=colour, found_shape=shape,
        found_position=position, ok_shape_colour=colour == asked.colour,
        ok_background=None if asked.background is None else names[bg] == asked.background,
        ok_position=None if asked.position is None else position == asked.position)


# -- inpainting: the masked region only, and how much of the rest was kept ---------------------------------
MIN_REGION_FRACTION = 0.05  # below this share of the masked region off the background, no shape was drawn there
KEPT_PSNR_DB = 20.0  # outside the mask; measured on fastsd-shapes (README "Task accuracy"): the toy VAE's own
# round trip keeps 24-36 dB there, and a 4-channel inpaint (diffusers' blend) 27 dB at the median


def psnr(image: Image.Image, reference: Image.Image, where: Optional[np.ndarray] = None) -> float:
    """PSNR in dB of `image` against `reference` (8-bit RGB) over the pixels where `where` is True (all when
    None); inf when they are equal there."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    b = np.asarray(reference.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape[1::-1]} and {b.shape[1::-1]}")
    d = (a - b) ** 2
    mse = float(d[where].mean() if where is not None else d.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def mask_array(mask: Image.Image) -> np.ndarray:
    """White = repaint, as the engine reads a mask (binarized at half grey): (H, W) bool."""
    return np.asarray(mask.convert("L")) >= 128


@dataclass
class RegionVerdict:
    asked: Prompt
    background: str                # the colour the region's background is taken to be
    found_colour: Optional[str]    # the majority colour of the region off the background; None: nothing drawn
    found_shape: Optional[str]     # from the fill ratio of that colour's bounding box inside the region
    kept_psnr: Optional[float]     # dB, the pixels outside the mask against the input; None without an input

    @property
    def ok_region(self) -> bool:
        return self.found_colour == self.asked.colour

    @property
    def ok_kept(self) -> Optional[bool]:
        return None if self.kept_psnr is None else bool(self.kept_psnr >= KEPT_PSNR_DB)

    @property
    def ok(self) -> bool:
        return self.ok_region and self.ok_kept is not False

    def __str__(self) -> str:
        parts = [f"{self.found_colour or 'no'} shape in the mask (asked {self.asked.colour})"
                 + ("" if self.ok_region else " WRONG")]
        if self.found_shape:
            parts.append(f"looks like a {self.found_shape}")
        if self.kept_psnr is not None:
            parts.append(f"outside the mask {self.kept_psnr:.1f} dB of the input"
                         + ("" if self.ok_kept else f" WRONG (< {KEPT_PSNR_DB:g} dB)"))
        return ("ok: " if self.ok else "WRONG: ") + ", ".join(parts)


def judge_region(image: Image.Image, prompt: str, mask: Image.Image,
                 original: Optional[Image.Image] = None) -> RegionVerdict:
    """An inpainted image: does the masked region (white) show the prompt's shape colour, and (given the
    input image) how close did the pixels outside the mask stay to it? The region's background is the
    prompt's background colour, else the majority of the image's border ring outside the mask."""
    asked = parse_prompt(prompt)
    where = mask_array(mask)
    if where.shape != (image.height, image.width):
        raise ValueError(f"mask of {where.shape[1]}x{where.shape[0]} for an image of {image.width}x{image.height}")
    if not where.any():
        raise ValueError("the mask is all black: no region to judge")
    palette = palette_for(asked)
    names = list(palette)
    idx = snap(image, palette)
    if asked.background:
        bg = names.index(asked.background)
    else:
        ring = np.zeros_like(where)
        ring[:2], ring[-2:], ring[:, :2], ring[:, -2:] = True, True, True, True
        ring &= ~where
        ring = ring if ring.any() else np.ones_like(where)
        bg = int(np.bincount(idx[ring], minlength=len(names)).argmax())
    fg = where & (idx != bg)
    colour = shape = None
    if fg.sum() >= MIN_REGION_FRACTION * where.sum():
        top = int(np.bincount(idx[fg], minlength=len(names)).argmax())
        colour = names[top]
        ys, xs = np.nonzero(fg & (idx == top))
        fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    kept = None if original is None else psnr(image, original, ~where)
    return RegionVerdict(asked=asked, background=names[bg], found_colour=colour, found_shape=shape, kept_psnr=kept)
