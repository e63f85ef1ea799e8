"""What a serving request may hold: ONE table of fields, used by every front door, so they cannot disagree.

- request.py's parser checks every field of a request with this table: the REST gateway (rest.py) on
  a `POST /score` body before it forwards anything, the replicas (through batcher.py and replica.py) on
  what arrives over gRPC (MII's client, or any raw gRPC caller, unpacked by `unpack_query_kwargs`)
  before a request is queued. Every failure is an `InvalidParameter` naming the field and what is
  allowed (gRPC INVALID_ARGUMENT, HTTP 422).
- Parsing is total: any JSON value and any protobuf `Value` either passes every check or is refused
  with a one-line reason. Nothing unchecked reaches MII's packing (which raises on a seed beyond 64
  bits or a lone UTF-16 surrogate) or the engine.

Adding a request field is ONE line: a `Param(...)` in PARAMS (a query keyword, REST `parameters`
and MII kwargs alike) or a `Column(...)` in COLUMNS (a per-row value of the REST `data` rows).
Its kind says the type (int, float, text, choice, bool, or `check=` a function of your own for
anything else); lo/hi the range (a number, or a function of the deployment's `Limits`).
"""
from __future__ import annotations

import base64
import binascii
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from .. import validation as v
from ..errors import InvalidParameter
from .image_urls import ImageUrl, allowed

SCHEDULERS = ("pndm", "ddim", "euler", "euler-ancestral", "dpm++", "lms", "lcm", "tcd")  # fastsd.schedulers
MAX_TEXT_CHARS = 10_000  # CLIP reads 77 tokens; longer text only costs tokenizer time
MAX_GUIDANCE = 1000.0    # far beyond any useful value, and exact in MII's 32-bit floats
SHOWN = 80               # characters of a refused value quoted back in an error


class Shown:
    """A refused value as an error quotes it: its repr, cut short (a 1 MB prompt must not come back
    in a gRPC status, whose metadata is limited to a few KB)."""

    def __init__(self, value):
        try:
            text = repr(value)
        except Exception:  # noqa: BLE001 - a value whose repr fails is still refused
            text = f"<{type(value).__name__}>"
        self.text = text if len(text) <= SHOWN else text[:SHOWN] + "..."

    def __repr__(self):
        return self.text


def refuse(name, value, allowed: str) -> InvalidParameter:
    """An InvalidParameter whose message is one short printable line, whatever the caller sent."""
    plain = isinstance(name, str) and len(name) <= SHOWN and name.isascii() and name.isprintable()
    return InvalidParameter(name if plain else repr(Shown(name)), Shown(value), allowed)


@dataclass(frozen=True)
class Param:
    """One request field. kind: "int" | "float" | "text" | "choice" | "bool"; `check(value, limits)`
    replaces the kind's check for a field with its own rules (it returns the value or raises)."""
    name: str
    kind: str
    doc: str
    lo: Any = None            # number or function(limits) -> number
    hi: Any = None
    multiple_of: int = 1
    choices: tuple = ()
    check: Callable | None = None

    def bound(self, which, limits):
        b = getattr(self, which)
        return b(limits) if callable(b) else b

    def allowed(self, limits) -> str:
        lo, hi = self.bound("lo", limits), self.bound("hi", limits)
        if self.kind == "int":
            return f"an integer in [{lo}, {hi}]" + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")
        if self.kind == "float":
            return f"a finite number in [{lo:g}, {hi:g}]"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        return f"text of at most {MAX_TEXT_CHARS} characters"

    def parse(self, value, limits):
        if self.check is not None:
            return self.check(value, limits)
        if self.kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if ok and self.bound("lo", limits) <= value <= self.bound("hi", limits) and value % self.multiple_of == 0:
                return int(value)
        elif self.kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if ok and math.isfinite(value) and self.bound("lo", limits) <= value <= self.bound("hi", limits):
                return float(value)
        elif self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
        elif self.kind == "bool":
            if isinstance(value, bool):
                return value
        elif self.kind == "text":
            return text(self.name, value)
        raise refuse(self.name, value, self.allowed(limits))


def text(name: str, value, non_blank: bool = False) -> str:
    """A string the rest of the stack can carry: UTF-8 encodable (no lone surrogates), bounded."""
    if not isinstance(value, str):
        raise refuse(name, value, "text" + (" (non-empty)" if non_blank else ""))
    if len(value) > MAX_TEXT_CHARS:
        raise refuse(name, value, f"text of at most {MAX_TEXT_CHARS} characters (got {len(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse(name, value, "valid Unicode text (no unpaired surrogates)") from None
    if non_blank and not value.strip():
        raise refuse(name, value, "non-empty text")
    return value


# -- the table --------------------------------------------------------------------------------------
# Query keywords (REST "parameters", MII query kwargs). Ranges that depend on the deployment are
# functions of its Limits. One line per field.
PARAMS = {p.name: p for p in [
    Param("num_inference_steps", "int", "denoising steps", 1, lambda lim: min(lim.max_steps, v.MAX_STEPS)),
    Param("guidance_scale", "float", "classifier-free guidance (off at 1 or below)", 0.0, MAX_GUIDANCE),
    Param("height", "int", "image height in pixels", v.MIN_SIZE, v.MAX_SIZE, multiple_of=8),
    Param("width", "int", "image width in pixels", v.MIN_SIZE, v.MAX_SIZE, multiple_of=8),
    Param("seed", "int", "seed of the first image (the next ones take seed+1, ...)", 0, v.MAX_SEED),
    Param("scheduler", "choice", "sampler", choices=SCHEDULERS),
    Param("eta", "float", "DDIM's eta, TCD's gamma: 0 deterministic .. 1 stochastic (ddim and tcd only)", 0.0, 1.0),
    Param("num_images_per_prompt", "int", "images per prompt", 1, lambda lim: lim.max_images),
    Param("lora", "text", "LoRA adapters of the deployment's --lora-dir: NAME[:SCALE][,NAME[:SCALE]]"),
    Param("strength", "float", "image-to-image, inpainting and depth-to-image: how much is repainted, in (0, 1]",
          0.0, 1.0),
    Param("noise_level", "int", "x4 upscaler: noise added to the low-res image (default 20)", 0, 350),
    Param("depth_map", "text", "depth-to-image: the image's depth map, base64 grayscale PNG (8- or 16-bit) or "
          ".npy HxW array, larger = nearer (default: the model's own estimator)",
          check=lambda val, lim: depth_map_cell(val, lim)),
]}
# REST only: a negative prompt for every row, as a parameter instead of a column
REST_ONLY_PARAMS = {"negative_prompt": Param("negative_prompt", "text", "negative prompt for every row")}
# Columns of the REST "data" rows (one value per row each); "prompt" is required.
COLUMNS = {c.name: c for c in [
    Param("prompt", "text", "what to draw", check=lambda val, lim: text("prompt", val, non_blank=True)),
    Param("negative_prompt", "text", "what to steer away from"),
    # Azure ML's image-to-image and inpainting formats: base64 images (decoded, under the limits, by the replica)
    Param("image", "text", "start image, base64 PNG/JPEG/WebP (or a URL under --image-url-allow)",
          check=lambda val, lim: image_cell("image", val, lim)),
    Param("mask_image", "text", "inpainting mask, base64; white = repaint (or a URL under --image-url-allow)",
          check=lambda val, lim: image_cell("mask_image", val, lim)),
]}
IMAGE_COLUMNS = ("image", "mask_image")


def image_cell(name: str, value, limits=None):
    """A base64 image cell -> its bytes; a URL under the deployment's --image-url-allow prefixes -> an
    ImageUrl that the REST gateway fetches (image_urls.py). Other URLs are refused: a server that fetches
    URLs on request can be sent to internal addresses (SSRF)."""
    if isinstance(value, str) and value.strip().lower().startswith(("http://", "https://", "ftp://", "file:")):
        prefixes = tuple(getattr(limits, "image_url_allow", ()) or ())
        if prefixes and allowed(value, prefixes):
            return ImageUrl(value.strip())
        if prefixes:
            raise refuse(name, "a URL outside the allowed prefixes", "a base64-encoded PNG, JPEG or WebP image, "
                         "or an http(s) URL starting with one of: " + ", ".join(prefixes))
        raise refuse(name, "a URL", "a base64-encoded PNG, JPEG or WebP image (this server does not fetch URLs: "
                                    "a server that fetches them on request can be sent to internal addresses; "
                                    "see fastsd serve --image-url-allow)")
    if not isinstance(value, str) or not value:
        raise refuse(name, value, "a base64-encoded PNG, JPEG or WebP image")
    body = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(name, "text that is not base64", "a base64-encoded PNG, JPEG or WebP image") from None
REQUIRED_COLUMNS = ("prompt",)


def depth_map_cell(value, limits=None) -> str:
    """A depth map parameter: base64 text (a data: URL's prefix dropped) of at most the deployment's image
    bytes. It stays text, which MII's query keywords carry as they are; the replica decodes the map
    (request.parse, fastsd.depth.decode_depth_map) under its pixel limit."""
    what = "a base64-encoded grayscale PNG (8- or 16-bit) or .npy HxW array"
    if not isinstance(value, str) or not value:
        raise refuse("depth_map", value, what)
    body = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    max_bytes = getattr(limits, "max_image_bytes", None) or 8 << 20
    if len(body) > 4 * (max_bytes // 3 + 1):
        raise refuse("depth_map", f"{len(body)} base64 characters", f"a depth map of at most {max_bytes} bytes")
    try:
        base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise refuse("depth_map", "text that is not base64", what) from None
    return body


def check_param(name, value, limits):
    """One query keyword: known, of its type, in its range. Returns the value as the engine takes it."""
    field = PARAMS.get(name) if isinstance(name, str) else None
    if field is None:
        raise refuse(name, value, "one of the parameters " + ", ".join(PARAMS))
    return field.parse(value, limits)


def check_params(kwargs: dict, limits) -> dict:
    return {k: check_param(k, val, limits) for k, val in kwargs.items()}


def unpack_query_kwargs(query_kwargs) -> dict:
    """MII's `map<string, Value>` -> plain values. MII's own unpacking fails (TypeError) on a Value
    with none of its fields set, which any raw gRPC caller can send."""
    out = {}
    for k, val in query_kwargs.items():
        which = val.WhichOneof("oneof_values")
        if which is None:
            raise refuse(k, None, "a value (text, integer, number or boolean)")
        out[k] = getattr(val, which)
    return out


def check_prompts(value, limit: int, name: str = "prompt", limits=None) -> list[str]:
    """Prompts (or negative prompts: `name`, a text column) from a request: one text or a list of
    1..limit texts, each checked by its column."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise refuse(name, value, "a non-empty string or a non-empty list of strings")
    if len(items) > limit:
        raise refuse(name, f"{len(items)} prompts", f"at most {limit} per request")
    return [COLUMNS[name].parse(p, limits) for p in items]
