"""What one request may ask for, and the one parser every front door calls.

Two stages, both here:
- `parse_query(fields, limits)`: transport-neutral, dict in -> `Query` out. Every field the caller sent
  (prompts, negative prompts, the keyword parameters, image cells) is checked by the one table in
  schema.py under the deployment's limits. It needs no model, so an HTTP route runs it before it
  forwards anything: `parse_score_body` (the model cards' `POST /score` format) is a thin adapter onto it,
  and other formats (OpenAI, A1111) are meant to be the same.
- `parse(...)`: what a replica runs on a request as MII delivers it. It calls `parse_query`, then the
  checks that span fields or need the model (images per request, pixels, the last image's seed, LoRA
  names, image sizes, strength) and returns the engine's `Request`, one entry per image.

Every failure is an `InvalidParameter` that names the parameter (gRPC INVALID_ARGUMENT, HTTP 422), or
for a body that is not the format at all a `BadBody` (HTTP 400).
"""
from __future__ import annotations

import base64
import math
import random
import struct
from dataclasses import asdict, dataclass, field

from .. import validation as check
from ..errors import InvalidParameter
from ..model_kinds import KIND_BY_CHANNELS
from . import schema
from .image_urls import ImageUrl

DEFAULT_STEPS = 50
QUERY_FIELDS = ("prompt", "negative_prompt", "parameters", "image", "mask_image")


class BadBody(ValueError):
    """A body that is not its route's format at all (HTTP 400)."""


@dataclass
class Limits:
    max_prompts: int = 8          # prompts in one request
    max_images: int = 16          # prompts x images per prompt in one request
    max_pixels: int = 1024 * 1024  # height x width
    max_steps: int = 150
    timeout: float = 300.0        # seconds from arrival to reply, queueing included
    max_image_bytes: int = 8 << 20  # encoded image and mask bytes in one request (decoded pixels: max_pixels)
    image_url_allow: tuple[str, ...] = ()  # URL prefixes the REST gateway fetches images from (image_urls.py)
    image_url_timeout: float = 10.0  # seconds to fetch one image URL

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Query:
    """A request as its caller sent it, every field checked (parse_query): what travels to a deployment."""
    prompts: list[str]
    negatives: list[str] | None  # None: the caller gave none
    parameters: dict             # query keywords (schema.PARAMS), as the engine takes them
    image: list = field(default_factory=list)       # encoded bytes, ImageUrl (REST) or decoded images (replica)
    mask_image: list = field(default_factory=list)  # the same; empty without masks


@dataclass
class Request:
    """One caller's request, normalised: one entry per image, prompt-major, as the engine orders them."""
    prompts: list[str]      # per image
    negatives: list[str]    # per image
    guidance: list[float]   # per image
    seeds: list[int]        # per image
    steps: int
    height: int
    width: int
    scheduler: str | None
    loras: tuple | None = None  # ((name, scale), ...) from the `lora` keyword; None: the deployment's default
    task: str = "text2img"  # text2img | img2img | inpaint (fastsd.tasks) | depth | upscale (the model's kind)
    images: list | None = None  # per image: PIL images (img2img, inpaint, depth, upscale)
    masks: list | None = None   # per image: PIL masks (inpaint)
    strength: float | None = None
    noise_level: int | None = None  # upscale
    depth_maps: list | None = None  # depth, per image: HxW float32 arrays the caller sent (None: the estimator's)
    eta: float = 0.0  # DDIM's eta / TCD's gamma (one per engine call: part of the key)

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one UNet batch (per-image seeds, prompts, negatives and
        guidance travel inside the batch). Guidance on/off is part of the key: the engine runs one
        UNet call per step without guidance and two with it, so mixing them would change images."""
        return (self.height, self.width, self.steps, self.scheduler, max(self.guidance) > 1.0, self.loras,
                self.task, self.strength, self.eta, self.noise_level, self.depth_maps is not None)


# -- stage 1: any transport ---------------------------------------------------------------------------
def parse_query(fields: dict, limits: Limits) -> Query:
    """{"prompt": text or [text], "negative_prompt": None, text or [text], "parameters": {name: value},
    "image": [cell], "mask_image": [cell]} -> Query. Image cells are base64 text or URLs (checked by the
    table), encoded bytes, or images a replica decoded under its limits."""
    unknown = [k for k in fields if k not in QUERY_FIELDS]
    if unknown:
        raise schema.refuse(unknown[0], fields[unknown[0]], "one of the fields " + ", ".join(QUERY_FIELDS))
    prompts = schema.check_prompts(fields.get("prompt"), limits.max_prompts, "prompt", limits)
    negatives = fields.get("negative_prompt")
    if isinstance(negatives, (list, tuple)) and len(negatives) == 0:
        negatives = None  # MII sends an empty list when the caller gave none
    if negatives is not None:
        negatives = schema.check_prompts(negatives, len(prompts), "negative_prompt", limits)
    parameters = fields.get("parameters", {})
    if not isinstance(parameters, dict):
        raise schema.refuse("parameters", parameters, "an object of parameters")
    return Query(prompts=prompts, negatives=negatives, parameters=schema.check_params(parameters, limits),
                 image=_image_cells("image", fields.get("image"), limits),
                 mask_image=_image_cells("mask_image", fields.get("mask_image"), limits))


def _image_cells(name: str, cells, limits: Limits) -> list:
    if cells is None:
        return []
    return [c if _carried_image(c) else schema.COLUMNS[name].parse(c, limits)
            for c in (cells if isinstance(cells, (list, tuple)) else [cells])]


def _carried_image(cell) -> bool:
    """Bytes a binary transport carried (decoded later, under the limits) or an image already decoded."""
    from PIL import Image  # not every process that reads a spec's limits needs PIL
    return isinstance(cell, (bytes, bytearray, ImageUrl, Image.Image))


# -- the /score body ------------------------------------------------------------------------------------
BODY_KEYS = ("input_data", "parameters")
INPUT_KEYS = ("columns", "data", "index", "parameters")
SCORE_FORMAT = 'expected {"input_data": {"columns": ["prompt"], "data": [...], "parameters": {...}}}'


def parse_score_body(doc, limits: Limits, with_images: bool = False) -> Query:
    """A decoded JSON `POST /score` body (the model cards' online-endpoint format) -> Query. The body's
    shape is checked here (BadBody), every value by parse_query. Without `with_images` the image
    columns are refused."""
    if not isinstance(doc, dict) or not isinstance(doc.get("input_data"), dict):
        raise BadBody(SCORE_FORMAT)
    unknown = [k for k in doc if k not in BODY_KEYS]
    if unknown:
        raise BadBody(f"unknown key {schema.Shown(unknown[0])} in the body; allowed: {', '.join(BODY_KEYS)}")
    inp = doc["input_data"]
    unknown = [k for k in inp if k not in INPUT_KEYS]
    if unknown:
        raise BadBody(f"input_data: unknown key {schema.Shown(unknown[0])}; allowed: {', '.join(INPUT_KEYS)}")
    columns = inp.get("columns", ["prompt"])
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise BadBody("input_data.columns: expected a non-empty list of column names")
    for c in columns:
        if c not in schema.COLUMNS or (c in schema.IMAGE_COLUMNS and not with_images):
            raise BadBody(f"input_data.columns: unknown column {schema.Shown(c)}; "
                          f"allowed: {', '.join(schema.COLUMNS)}")
    if "mask_image" in columns and "image" not in columns:
        raise schema.refuse("mask_image", "a mask column", "a mask only together with an image column")
    if len(set(columns)) != len(columns):
        raise BadBody("input_data.columns: a column is named twice")
    for c in schema.REQUIRED_COLUMNS:
        if c not in columns:
            raise BadBody(f'input_data.columns: a "{c}" column is required')
    data = inp.get("data")
    if not isinstance(data, list) or not data:
        raise BadBody("input_data.data: expected a non-empty list of rows")
    cells = {c: [] for c in columns}
    for row in data:
        if isinstance(row, dict):
            extra = [k for k in row if k not in columns]
            if extra:
                raise BadBody(f"input_data.data: row key {schema.Shown(extra[0])} is not a column "
                              f"({', '.join(columns)})")
            row = [row.get(c) for c in columns]
        elif not isinstance(row, list) and len(columns) == 1:
            row = [row]
        if not isinstance(row, list) or len(row) != len(columns):
            raise BadBody(f"input_data.data: each row must be a prompt, an object or a list of {len(columns)} "
                          f"values ({', '.join(columns)}); got {schema.Shown(row)}")
        for c, val in zip(columns, row):
            cells[c].append(val)
    params = {}
    for where, p in (("parameters", doc.get("parameters")), ("input_data.parameters", inp.get("parameters"))):
        if p is None:
            continue
        if not isinstance(p, dict):
            raise BadBody(f"{where}: expected an object of parameters")
        params.update(p)
    negatives = cells.get("negative_prompt")
    for k in [k for k in params if k in schema.REST_ONLY_PARAMS]:
        if negatives is not None:
            raise BadBody(f"{k}: give it as a column or as a parameter, not both")
        negatives = [schema.REST_ONLY_PARAMS[k].parse(params.pop(k), limits)] * len(data)
    return parse_query({"prompt": cells["prompt"], "negative_prompt": negatives, "parameters": params,
                        "image": cells.get("image", []), "mask_image": cells.get("mask_image", [])}, limits)


# -- stage 2: a replica, with its model -------------------------------------------------------------------
def _f32_to_float(v: float) -> float:
    """MII sends floats as 32-bit; 7.3 arrives as 7.300000190734863. The shortest decimal that
    rounds to the same float32 gives back what the caller typed."""
    if not isinstance(v, float) or not math.isfinite(v) or abs(v) > 3.4e38:  # beyond float32: not from MII
        return v
    for digits in range(1, 10):
        s = float(f"{v:.{digits}g}")
        if _as_f32(s) == _as_f32(v):
            return s
    return v


def _as_f32(v: float) -> bytes:
    return struct.pack("<f", v)


def parse(prompt, negative_prompt, kwargs: dict, limits: Limits, native_size: int,
          from_f32: bool = False, loras=None, image=None, mask_image=None, unet_in_channels: int = 4) -> Request:
    """A request as a replica receives it -> the engine's Request. `from_f32`: the keyword values came
    through MII (32-bit floats); `loras`: the deployment's fastsd.serving.loras.LoraCatalog (None: it
    offers none); `image`, `mask_image`: decoded images. Every field is checked by parse_query, then
    the checks that span fields (images per request, pixels, the last image's seed) or need the model."""
    if from_f32 and isinstance(kwargs, dict):
        kwargs = {k: _f32_to_float(v) for k, v in kwargs.items()}
    q = parse_query({"prompt": prompt, "negative_prompt": negative_prompt, "parameters": kwargs,
                     "image": image, "mask_image": mask_image}, limits)
    prompts, kw = q.prompts, dict(q.parameters)
    negatives = check.negative_prompts(q.negatives, len(prompts))
    n_img = kw.get("num_images_per_prompt", 1)
    total = len(prompts) * n_img
    if total > limits.max_images:
        raise InvalidParameter("num_images_per_prompt", n_img,
                               f"at most {limits.max_images} images per request (prompts x images per prompt)")
    steps = kw.get("num_inference_steps", min(DEFAULT_STEPS, limits.max_steps))  # the default obeys the limit too
    # image-to-image and inpainting: decoded PIL images (fastsd.images, under the limits), one or one per
    # prompt; without a mask (MII's client sends an empty list) it is image-to-image
    from .. import tasks  # torch: only a replica, which has its engine loaded, gets here
    image = q.image or None
    mask_image = q.mask_image or None
    kind = KIND_BY_CHANNELS.get(unet_in_channels, "sd")
    if kind in ("depth", "upscale"):  # the model's own task: an image in, strength (depth) or noise_level
        kw.update(_kind_inputs(kind, image, mask_image, kw, len(prompts)))
    else:
        for name, what in (("noise_level", "an x4 upscaler"), ("depth_map", "a depth-to-image")):
            if name in kw:
                raise InvalidParameter(name, "a depth map" if name == "depth_map" else kw[name],
                                       f"only with {what} deployment")
        tasks.check_inputs(image, mask_image, kw.get("strength"), unet_in_channels)
    if image is not None and kind not in ("depth", "upscale"):
        for name, items in (("image", image), ("mask_image", mask_image)):
            if items is not None and len(items) not in (1, len(prompts)):
                raise InvalidParameter(name, f"{len(items)} images", f"1, or one per prompt ({len(prompts)})")
        kw["height"], kw["width"] = tasks.target_size(image, mask_image, kw.get("height"), kw.get("width"), False, 8)
    height = kw.get("height", native_size)
    width = kw.get("width", native_size)
    if height * width > limits.max_pixels:
        raise InvalidParameter("height x width", f"{height}x{width}", f"at most {limits.max_pixels} pixels")
    g = kw.get("guidance_scale", 7.5)
    scheduler = kw.get("scheduler")
    seed = kw.get("seed")
    if seed is None:
        seed = random.randrange(2**31)  # drawn here so the image does not depend on its batch
    if seed > check.MAX_SEED - total:
        raise InvalidParameter("seed", seed, f"an integer in [0, {check.MAX_SEED - total}] ({total} images take "
                                             "seed, seed+1, ...)")
    lora = None
    if "lora" in kw:
        if loras is None:
            raise InvalidParameter("lora", kw["lora"], "nothing: this deployment was started without --lora-dir")
        lora = loras.parse(kw["lora"])
    extra = {}
    if image is not None:
        def per_image(items):  # one per generated image (prompt-major), as the engine takes them in a batch
            return [items[0 if len(items) == 1 else p] for p in range(len(prompts)) for _ in range(n_img)]
        strength = tasks.strength_value(kw.get("strength"), mask_image is not None)
        task = kind if kind in ("depth", "upscale") else "inpaint" if mask_image is not None else "img2img"
        extra = {"task": task, "images": per_image(image),
                 "masks": per_image(mask_image) if mask_image is not None else None, "strength": strength}
        if kind == "upscale":
            extra.update(strength=None, noise_level=kw.get("noise_level", 20))
        elif int(steps * strength) < 1:
            raise InvalidParameter("strength", strength, f"at least 1/{steps} with {steps} steps")
        if "depth_map" in kw:  # (a depth deployment's) base64 text, checked by the table; decoded here
            from .. import depth  # lazy: torch, as tasks above
            data = base64.b64decode(kw["depth_map"])
            extra["depth_maps"] = per_image([depth.decode_depth_map(data, max_pixels=limits.max_pixels)])
    elif "strength" in kw:
        raise InvalidParameter("strength", kw["strength"], "only with an image (image-to-image or inpainting)")
    return Request(prompts=[p for p in prompts for _ in range(n_img)],
                   negatives=[n for n in negatives for _ in range(n_img)],
                   guidance=[g] * total, seeds=[seed + i for i in range(total)],
                   steps=steps, height=height, width=width, scheduler=scheduler, loras=lora,
                   eta=kw.get("eta", 0.0), **extra)


def _kind_inputs(kind: str, image, mask_image, kw: dict, prompts: int) -> dict:
    """A depth or x4 upscaler deployment: an image (one, or one per prompt) and no mask; the upscaler's output
    is 4x the image (no height/width, no strength). Returns the height and width of the output."""
    from .. import tasks  # torch: only a replica, which has its engine loaded, gets here
    what = "a depth-to-image model" if kind == "depth" else "the x4 upscaler"
    if image is None:
        raise InvalidParameter("image", None, f"an image: this deployment runs {what}")
    if mask_image is not None:
        raise InvalidParameter("mask_image", "a mask", f"no mask: this deployment runs {what}")
    if len(image) not in (1, prompts):
        raise InvalidParameter("image", f"{len(image)} images", f"1, or one per prompt ({prompts})")
    if kind == "depth":
        if "noise_level" in kw:
            raise InvalidParameter("noise_level", kw["noise_level"], "only with an x4 upscaler deployment")
        if "depth_map" in kw and len(image) > 1:
            raise InvalidParameter("depth_map", "one map for several images", "a depth map with one image (the "
                                   "image's map); send one request per image")
        tasks.strength_value(kw.get("strength"))
        height, width = tasks.target_size(image, None, kw.get("height"), kw.get("width"), False, 8)
        return {"height": height, "width": width}
    if "depth_map" in kw:
        raise InvalidParameter("depth_map", "a depth map", "only with a depth-to-image deployment")
    for name in ("height", "width", "strength"):
        if name in kw:
            raise InvalidParameter(name, kw[name], "nothing with the x4 upscaler: its output is 4x the image")
    sizes = {im.size for im in image}
    if len(sizes) > 1:
        raise InvalidParameter("image", sorted(sizes), "images of one size (width, height)")
    w, h = sizes.pop()
    if w % 8 or h % 8 or not check.MIN_SIZE <= 4 * w <= check.MAX_SIZE or not check.MIN_SIZE <= 4 * h <= check.MAX_SIZE:
        raise InvalidParameter("image", f"{w}x{h}", f"multiples of 8 from {check.MIN_SIZE // 4} to "
                               f"{check.MAX_SIZE // 4} pixels a side (the output is 4x)")
    return {"height": 4 * h, "width": 4 * w}
