"""What one request may ask for, checked before it reaches a batch. Each field is checked by the
one table in schema.py (shared with the REST gateway), and a deployment's limits narrow the ranges;
every failure is an `InvalidParameter` that names the parameter, which the replica turns into gRPC
INVALID_ARGUMENT and the REST gateway into HTTP 422."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from .. import validation as check
from ..errors import InvalidParameter
from . import schema
from .schema import SCHEDULERS  # noqa: F401 - kept where callers found it

# the query keywords a request may use; anything else is refused (a typo must not be silently ignored)
KWARGS = tuple(schema.PARAMS)
DEFAULT_STEPS = 50


@dataclass
class Limits:
    max_prompts: int = 8          # prompts in one request
    max_images: int = 16          # prompts x images per prompt in one request
    max_pixels: int = 1024 * 1024  # height x width
    max_steps: int = 150
    timeout: float = 300.0        # seconds from arrival to reply, queueing included
    max_image_bytes: int = 8 << 20  # encoded image and mask bytes in one request (decoded pixels: max_pixels)
    image_url_allow: tuple = ()   # URL prefixes whose images the REST gateway fetches (image_urls.py); else refused
    image_url_timeout: float = 10.0  # seconds to fetch one image URL

    def to_dict(self) -> dict:
        return asdict(self)


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
    task: str = "text2img"  # text2img | img2img | inpaint (fastsd.tasks)
    images: list | None = None  # per image: PIL images (img2img, inpaint)
    masks: list | None = None   # per image: PIL masks (inpaint)
    strength: float | None = None
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
                self.task, self.strength, self.eta)


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
    import struct
    return struct.pack("<f", v)


def parse(prompt, negative_prompt, kwargs: dict, limits: Limits, native_size: int,
          from_f32: bool = False, loras=None, image=None, mask_image=None, unet_in_channels: int = 4) -> Request:
    """`loras`: the deployment's fastsd.serving.loras.LoraCatalog (None: it offers none).
    Every field is checked by the one table in schema.py (type and range), then the checks that
    span fields (images per request, pixels, the last image's seed)."""
    prompts = schema.check_prompts(prompt, limits.max_prompts)
    if negative_prompt is not None and not isinstance(negative_prompt, str) and isinstance(negative_prompt, (list, tuple)) \
            and len(negative_prompt) == 0:
        negative_prompt = None  # MII sends an empty list when the caller gave none
    if negative_prompt is not None:
        negative_prompt = schema.check_prompts(negative_prompt, len(prompts), "negative_prompt", allow_blank=True)
    negatives = check.negative_prompts(negative_prompt, len(prompts))
    if not isinstance(kwargs, dict):
        raise schema.refuse("query_kwargs", kwargs, "an object of parameters")
    kw = schema.check_params({k: (_f32_to_float(v) if from_f32 else v) for k, v in kwargs.items()}, limits)

    n_img = kw.get("num_images_per_prompt", 1)
    total = len(prompts) * n_img
    if total > limits.max_images:
        raise InvalidParameter("num_images_per_prompt", n_img,
                               f"at most {limits.max_images} images per request (prompts x images per prompt)")
    steps = kw.get("num_inference_steps", min(DEFAULT_STEPS, limits.max_steps))  # the default obeys the limit too
    # image-to-image and inpainting: decoded PIL images (fastsd.images, under the limits), one or one per
    # prompt; without a mask (MII's client sends an empty list) it is image-to-image
    from .. import tasks
    image = image or None
    mask_image = mask_image or None
    tasks.check_inputs(image, mask_image, kw.get("strength"), unet_in_channels)
    if image is not None:
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
        extra = {"task": "inpaint" if mask_image is not None else "img2img", "images": per_image(image),
                 "masks": per_image(mask_image) if mask_image is not None else None, "strength": strength}
        if int(steps * strength) < 1:
            raise InvalidParameter("strength", strength, f"at least 1/{steps} with {steps} steps")
    elif "strength" in kw:
        raise InvalidParameter("strength", kw["strength"], "only with an image (image-to-image or inpainting)")
    return Request(prompts=[p for p in prompts for _ in range(n_img)],
                   negatives=[n for n in negatives for _ in range(n_img)],
                   guidance=[g] * total, seeds=[seed + i for i in range(total)],
                   steps=steps, height=height, width=width, scheduler=scheduler, loras=lora,
                   eta=kw.get("eta", 0.0), **extra)
