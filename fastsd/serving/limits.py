"""What one request may ask for, checked before it reaches a batch. Values go through the engine's
own validation (fastsd.validation), and a deployment's limits narrow them; every failure is an
`InvalidParameter` that names the parameter, which the replica turns into gRPC INVALID_ARGUMENT
and the REST gateway into HTTP 422."""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import asdict, dataclass

from .. import validation as check
from ..errors import InvalidParameter

SCHEDULERS = ("pndm", "ddim", "euler", "euler-ancestral", "dpm++", "lms")
# query keyword -> what it means; anything else is refused (a typo must not be silently ignored)
KWARGS = ("num_inference_steps", "guidance_scale", "height", "width", "seed", "scheduler", "num_images_per_prompt",
          "strength")


@dataclass
class Limits:
    max_prompts: int = 8          # prompts in one request
    max_images: int = 16          # prompts x images per prompt in one request
    max_pixels: int = 1024 * 1024  # height x width
    max_steps: int = 150
    timeout: float = 300.0        # seconds from arrival to reply, queueing included
    max_image_bytes: int = 8 << 20  # encoded image and mask bytes in one request (decoded pixels: max_pixels)

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
    task: str = "text2img"  # text2img | img2img | inpaint (fastsd.tasks)
    images: list | None = None  # per image: PIL images (img2img, inpaint)
    masks: list | None = None   # per image: PIL masks (inpaint)
    strength: float | None = None

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one UNet batch (per-image seeds, prompts, negatives and
        guidance travel inside the batch). Guidance on/off is part of the key: the engine runs one
        UNet call per step without guidance and two with it, so mixing them would change images."""
        return (self.height, self.width, self.steps, self.scheduler, max(self.guidance) > 1.0, self.task,
                self.strength)


def _f32_to_float(v: float) -> float:
    """MII sends floats as 32-bit; 7.3 arrives as 7.300000190734863. The shortest decimal that
    rounds to the same float32 gives back what the caller typed."""
    if not isinstance(v, float) or not math.isfinite(v):
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
          from_f32: bool = False, image=None, mask_image=None, unet_in_channels: int = 4) -> Request:
    """`image`/`mask_image`: decoded PIL images (fastsd.images, under the limits): one, or one per prompt.
    Without a mask it is image-to-image; an empty mask list counts as none (MII's client sends one)."""
    from .. import tasks
    prompts = check.prompts(prompt)
    if len(prompts) > limits.max_prompts:
        raise InvalidParameter("prompt", f"{len(prompts)} prompts", f"at most {limits.max_prompts} per request")
    if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) == 0:
        negative_prompt = None  # MII sends an empty list when the caller gave none
    negatives = check.negative_prompts(negative_prompt, len(prompts))
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise InvalidParameter(unknown[0], kwargs[unknown[0]], "one of the parameters " + ", ".join(KWARGS))
    kw = {k: (_f32_to_float(v) if from_f32 else v) for k, v in kwargs.items()}

    n_img = _int("num_images_per_prompt", kw.get("num_images_per_prompt", 1), 1, limits.max_images)
    total = len(prompts) * n_img
    if total > limits.max_images:
        raise InvalidParameter("num_images_per_prompt", n_img,
                               f"at most {limits.max_images} images per request (prompts x images per prompt)")
    steps = _int("num_inference_steps", kw.get("num_inference_steps", 50), 1, min(limits.max_steps, check.MAX_STEPS))
    image = image or None
    mask_image = mask_image or None
    tasks.check_inputs(image, mask_image, kw.get("strength"), unet_in_channels)
    if image is not None:
        for name, items in (("image", image), ("mask_image", mask_image)):
            if items is not None and len(items) not in (1, len(prompts)):
                raise InvalidParameter(name, f"{len(items)} images", f"1, or one per prompt ({len(prompts)})")
        h0, w0 = tasks.target_size(image, mask_image, kw.get("height"), kw.get("width"), False, 8)
        kw["height"], kw["width"] = h0, w0
    height = _size("height", kw.get("height", native_size))
    width = _size("width", kw.get("width", native_size))
    if height * width > limits.max_pixels:
        raise InvalidParameter("height x width", f"{height}x{width}", f"at most {limits.max_pixels} pixels")
    g = kw.get("guidance_scale", 7.5)
    try:
        g = check.guidance(g)
    except InvalidParameter:
        raise InvalidParameter("guidance_scale", g, "a finite number >= 0 (guidance is off at 1 or below)") from None
    scheduler = kw.get("scheduler")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InvalidParameter("scheduler", scheduler, ", ".join(SCHEDULERS))
    seed = kw.get("seed")
    if seed is None:
        seed = random.randrange(2**31)  # drawn here so the image does not depend on its batch
    seed = _int("seed", seed, 0, check.MAX_SEED - total)
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
                   steps=steps, height=height, width=width, scheduler=scheduler, **extra)


def _int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise InvalidParameter(name, value, f"an integer in [{lo}, {hi}]")
    return int(value)


def _size(name, value):
    v = _int(name, value, check.MIN_SIZE, check.MAX_SIZE)
    if v % 8:
        raise InvalidParameter(name, value, f"a multiple of 8 in [{check.MIN_SIZE}, {check.MAX_SIZE}]")
    return v
