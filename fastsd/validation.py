"""Checks on what a user asks for, before any model runs. Each failure names the parameter and the
allowed range (an `InvalidParameter`), so a caller never sees a traceback from inside torch."""
from __future__ import annotations

import math
import numbers

from .errors import InvalidParameter

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 1000
MAX_IMAGES = 64  # prompts x images per prompt in one call
MAX_SEED = 2**63 - 1


def prompts(value, name: str = "prompt", allow_empty: bool = False) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidParameter(name, value, "a non-empty string or a non-empty list of strings")
    for p in items:
        if not isinstance(p, str):
            raise InvalidParameter(name, p, "text (str)")
        if not allow_empty and not p.strip():
            raise InvalidParameter(name, p, "non-empty text")
    return list(items)


def negative_prompts(value, count: int) -> list[str]:
    if value is None:
        return [""] * count
    items = prompts(value, "negative_prompt", allow_empty=True)
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise InvalidParameter("negative_prompt", value, f"one text, or one per prompt ({count})")
    return items


def _int(name: str, value, lo: int, hi: int, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameter(name, value, f"an integer in [{lo}, {hi}]{extra}")
    if not lo <= int(value) <= hi:
        raise InvalidParameter(name, value, f"an integer in [{lo}, {hi}]{extra}")
    return int(value)


def size(name: str, value) -> int:
    v = _int(name, value, MIN_SIZE, MAX_SIZE, ", a multiple of 8")
    if v % 8:
        raise InvalidParameter(name, value, f"a multiple of 8 in [{MIN_SIZE}, {MAX_SIZE}]")
    return v


def steps(value) -> int:
    return _int("steps", value, 1, MAX_STEPS)


def num_images(value) -> int:
    return _int("num_images", value, 1, MAX_IMAGES)


def guidance(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InvalidParameter("guidance", value, "a finite number >= 0 (guidance is off at 1 or below)")
    return float(value)


def eta(value) -> float:
    """DDIM's eta and TCD's gamma (diffusers' pipeline argument `eta`): 0 deterministic .. 1 fully stochastic."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise InvalidParameter("eta", value, "a number in [0, 1] (DDIM's eta, TCD's gamma; default 0)")
    return float(value)


def seeds(value, count: int) -> list[int] | None:
    """One seed per image: an int S gives S, S+1, ...; a list gives each image its own."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidParameter("seed", value, f"one integer, or a list of {count} (one per image)")
        return [_int("seed", s, 0, MAX_SEED) for s in value]
    s = _int("seed", value, 0, MAX_SEED)
    return [s + i for i in range(count)]


MAX_LORA_SCALE = 10.0


def lora_scale(value, name: str = "lora") -> float:
    """A LoRA's fusing scale: a finite number in [-MAX_LORA_SCALE, MAX_LORA_SCALE]."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} scale", value, f"a number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]") \
            from None
    if not math.isfinite(s) or abs(s) > MAX_LORA_SCALE:
        raise InvalidParameter(f"{name} scale", value, f"a number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]")
    return s
