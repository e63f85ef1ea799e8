"""The denoising loop, backend-neutral: prompt -> tokens -> embeddings -> scheduler loop (UNet with
classifier-free guidance batched into one call) -> VAE decode -> safety check -> PIL images.

It follows diffusers' StableDiffusionPipeline step for step, so that in FP32 on the CPU it gives the
same images for the same seeds; a backend (fastsd.backends) decides how the three networks run."""
from __future__ import annotations

import inspect
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from . import tasks, tasks_depth, tasks_upscale
from . import validation as check
from .errors import FastSDError, InvalidParameter
from .lora import LoraSwitcher, as_refs
from .schedulers import check_steps, make_scheduler, scheduler_name, takes_eta

log = logging.getLogger("fastsd")

# the tasks of a depth or upscale model (fastsd.model_kinds): module with check(...) and make(...)
KIND_TASKS = {"depth": tasks_depth, "upscale": tasks_upscale}


class NonFiniteOutput(FastSDError):
    """NaN or inf in latents or images: usually fp16 overflow; fp32 (or bf16) avoids it."""


@dataclass
class GenerationResult:
    images: list  # PIL images, prompt-major: p0 i0, p0 i1, p1 i0, ...
    nsfw_content_detected: list[bool]
    seeds: list[int]
    latents: torch.Tensor  # final latents, fp32 on the CPU (before VAE scaling)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    prompts: list[str] = field(default_factory=list)


class Engine:
    """Runs generation with a backend. Build one with `fastsd.optimize(model, config)`."""

    def __init__(self, model, backend, config, embedding_cache_size: int = 256):
        self.model, self.backend, self.config = model, backend, config
        self.tokenizer = model.tokenizer
        self.scheduler = model.scheduler  # the model's own; a named one overrides it per call
        self.safety_checker = model.safety_checker if config.safety_checker else None
        self.feature_extractor = model.feature_extractor
        self.image_processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = embedding_cache_size
        self.cache_hits = 0
        self.loras = None  # fastsd.lora.LoraSwitcher, made on the first set_loras

    # -- LoRA adapters (fastsd/lora.py) ---------------------------------------------------------------
    def set_loras(self, loras, *, allow_pickle: bool = False):
        """Fuse this LoRA set ([(path, scale), ...] or ["FILE:SCALE", ...]; [] for none) into the weights,
        in place of the current one: the base weights are restored exactly first. Returns the switch's
        figures (fastsd.lora.SwitchStats)."""
        if not hasattr(self.backend, "lora_weights"):
            if not as_refs(loras):
                return None
            raise InvalidParameter("lora", [str(r) for r in as_refs(loras)],
                                   f"none on the {self.backend.name} backend (LoRAs are fused on the torch, "
                                   "onnxruntime and openvino backends)")
        if self.loras is None:
            self.loras = LoraSwitcher(self.backend.lora_weights(), unet_config=self.model.unet.config)
        stats = self.loras.set(loras, allow_pickle=allow_pickle)
        if stats.changed:
            self._cache.clear()  # text embeddings depend on the text encoder's weights
        return stats

    # -- text ---------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        max_len = self.tokenizer.model_max_length
        ids = self.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids
        for t in texts:  # warn, as diffusers does, about text the encoder never sees
            n = len(self.tokenizer(t, truncation=False).input_ids)
            if n > max_len:
                log.warning("prompt: %d tokens, longer than the %d the text encoder takes; truncated: %r",
                            n, max_len, t[:60])
        return ids

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings [len(texts), seq, hidden], from the cache where a text was seen before."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            emb = self.backend.encode_text(self._tokenize(missing))
            for t, e in zip(missing, emb):
                self._cache[t] = e
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        self.cache_hits += len(texts) - len(missing)
        for t in texts:
            self._cache.move_to_end(t)
        return torch.stack([self._cache[t] for t in texts])

    # -- the loop -----------------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt=None, *, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 50, guidance_scale=7.5, height: int | None = None,
                 width: int | None = None, seed=None, scheduler: str | None = None,
                 progress: bool = True, output_type: str = "pil", image=None, mask_image=None,
                 strength: float | None = None, resize: bool = False, eta: float = 0.0, on_step=None,
                 depth_map=None, noise_level: int | None = None, tile_size: int | None = None) -> GenerationResult:
        """Text-to-image; with `image`, image-to-image; with `image` and `mask_image` (white = repaint),
        inpainting (fastsd.tasks). `strength` defaults to 0.8 for image-to-image and 1.0 for inpainting, as
        in diffusers. Images: one for all, one per prompt, or one per generated image. The
        output has the image's size unless height/width say otherwise (then `resize` must be set).
        `eta`: DDIM's eta / TCD's gamma, diffusers' pipeline argument (default 0.0, as there); guidance at or
        below 1 turns classifier-free guidance off (one UNet call per step at the batch size).
        `on_step(step, steps)` is called after each denoising step; an exception it raises ends the call.
        A depth model takes `image` and `depth_map` (fastsd.tasks_depth); the x4 upscaler `image`,
        `noise_level` and `tile_size` (fastsd.tasks_upscale), its output 4x the image's size."""
        prompts = check.prompts(prompt)
        negatives = check.negative_prompts(negative_prompt, len(prompts))
        n_img = check.num_images(num_images_per_prompt)
        steps = check.steps(num_inference_steps)
        kind_tasks = KIND_TASKS.get(self.model.kind)
        kind_inputs = {k: v for k, v in (("depth_map", depth_map), ("noise_level", noise_level),
                                         ("tile_size", tile_size)) if v is not None}
        if kind_tasks is not None:
            height, width = kind_tasks.check(self.model, image=image, mask_image=mask_image, strength=strength,
                                             height=height, width=width, resize=resize, **kind_inputs)
        elif kind_inputs:
            name = next(iter(kind_inputs))
            value = kind_inputs[name]
            raise InvalidParameter(name, f"a {type(value).__name__}" if hasattr(value, "shape") else value,
                                   f"nothing with this model ({self.model.kind}): depth_map with a depth model, "
                                   "noise_level and tile_size with the x4 upscaler")
        else:
            tasks.check_inputs(image, mask_image, strength, self.model.unet.config.in_channels)
        if image is not None and kind_tasks is None:
            height, width = tasks.target_size(image, mask_image, height, width, resize, self.model.vae_scale_factor)
        height = check.size("height", height if height is not None else self.model.native_size)
        width = check.size("width", width if width is not None else self.model.native_size)
        batch = len(prompts) * n_img
        check.num_images(batch)
        gscales = guidance_scale if isinstance(guidance_scale, (list, tuple)) else [guidance_scale] * len(prompts)
        if len(gscales) != len(prompts):
            raise check.InvalidParameter("guidance", guidance_scale, f"one number or one per prompt ({len(prompts)})")
        gscales = [check.guidance(g) for g in gscales]
        seeds = check.seeds(seed, batch) or [random.randrange(2**31) for _ in range(batch)]
        sched = make_scheduler(scheduler, self.scheduler.config) if scheduler else \
            type(self.scheduler).from_config(self.scheduler.config)  # fresh state per call
        check_steps(sched, steps)
        eta = check.eta(eta)
        if eta and not takes_eta(sched):
            raise InvalidParameter("eta", eta, f"0 with the {scheduler_name(sched)} scheduler (eta is read by ddim and "
                                   "tcd only)")

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        device = self.backend.device
        # guidance off at 1 or below: one UNet call per step (as diffusers decides it)
        do_cfg = max(gscales) > 1.0 and self.model.unet.config.time_cond_proj_dim is None
        cond = self.encode(prompts).repeat_interleave(n_img, dim=0)
        if do_cfg:
            uncond = self.encode(negatives).repeat_interleave(n_img, dim=0)
            text_emb = torch.cat([uncond, cond])
        else:
            text_emb = cond
        timings["text_encoder"] = time.perf_counter() - t0

        if kind_tasks is not None:
            task = kind_tasks.make(self.model, self.backend, image=image, strength=strength, prompts=len(prompts),
                                   per_prompt=n_img, height=height, width=width, guided=do_cfg, **kind_inputs)
        else:
            task = tasks.make_task(image=image, mask_image=mask_image, strength=strength, prompts=len(prompts),
                                   per_prompt=n_img, height=height, width=width,
                                   unet_in_channels=self.model.unet.config.in_channels,
                                   vae_scale_factor=self.model.vae_scale_factor,
                                   scaling_factor=self.model.vae.config.scaling_factor, guided=do_cfg,
                                   latent_channels=getattr(self.model.vae.config, "latent_channels", 4))
        self.backend.prepare(batch, height, width, do_cfg)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latent_shape = (getattr(self.model.vae.config, "latent_channels", 4), height // self.model.vae_scale_factor,
                        width // self.model.vae_scale_factor)
        sched.set_timesteps(steps, device=device)
        # noise drawn on the CPU per image, as diffusers' randn_tensor does for a list of generators; the
        # task picks the start step and the start latents (pure noise, or a noised image)
        timesteps, latents = task.start(sched, steps, self.backend, generators, latent_shape, device)
        step_kwargs = {}
        params = set(inspect.signature(sched.step).parameters)
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generators
        g = torch.tensor([gs for gs in gscales for _ in range(n_img)], dtype=torch.float32, device=device)
        unet_kwargs = self._guidance_embedding(g - 1.0)
        g = g.view(-1, 1, 1, 1)

        t1 = time.perf_counter()
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = task.unet_input(sched.scale_model_input(model_in, t))
            noise = task.predict(self.backend, model_in, t, text_emb, **unet_kwargs).float()
            if do_cfg:
                n_uncond, n_text = noise.chunk(2)
                noise = n_uncond + (g if len(set(gscales)) > 1 else gscales[0]) * (n_text - n_uncond)
            latents = sched.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            latents = task.after_step(latents, i, timesteps, sched)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        if not torch.isfinite(latents).all():
            raise NonFiniteOutput(f"latents became NaN/inf during denoising in {self.backend.dtype}; "
                                  "run with --dtype fp32 (or bf16)")
        timings.update(task.timings)
        timings["unet_loop"] = time.perf_counter() - t1
        timings["unet_step"] = timings["unet_loop"] / max(1, len(timesteps))

        t2 = time.perf_counter()
        image = self.backend.decode(latents / self.model.vae.config.scaling_factor).float()
        timings["vae_decode"] = time.perf_counter() - t2
        if not torch.isfinite(image).all():
            raise NonFiniteOutput(f"the VAE decode gave NaN/inf in {self.backend.dtype}; run the VAE in fp32")

        t3 = time.perf_counter()
        image, nsfw = self._safety_check(image.cpu().clone())  # a normal tensor: the checker edits in place
        timings["safety_checker"] = time.perf_counter() - t3
        if output_type == "pt":
            images = image
        else:
            images = self.image_processor.postprocess(image, output_type=output_type,
                                                      do_denormalize=[not f for f in nsfw])
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(images, nsfw, seeds, latents.float().cpu(), timings,
                                [p for p in prompts for _ in range(n_img)])

    def _guidance_embedding(self, w: torch.Tensor) -> dict:
        """An LCM-distilled UNet (time_cond_proj_dim set) takes guidance as an embedding of w = guidance - 1 instead
        of classifier-free guidance: diffusers' own get_guidance_scale_embedding, per image. {} for any other UNet."""
        dim = self.model.unet.config.time_cond_proj_dim
        if dim is None:
            return {}
        if not getattr(self.backend, "takes_timestep_cond", False):
            raise InvalidParameter("model", "an LCM-distilled UNet (time_cond_proj_dim)",
                                   f"a UNet without a guidance embedding on the {self.backend.name} backend "
                                   "(LCM-distilled models run on the torch backend; LCM-LoRAs on every backend)")
        from diffusers import StableDiffusionPipeline
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float().cpu(), embedding_dim=int(dim))
        return {"timestep_cond": emb.to(self.backend.device)}

    def _safety_check(self, image: torch.Tensor):
        if self.safety_checker is None:
            return image, [False] * image.shape[0]
        pil = self.image_processor.postprocess(image, output_type="pil")
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values
        sc_param = next(self.safety_checker.parameters())
        image, flags = self.safety_checker(images=image, clip_input=clip_input.to(sc_param.device, sc_param.dtype))
        return image, [bool(f) for f in flags]

    def describe(self) -> dict:
        d = {"model": self.model.name, "source": self.model.source, "kind": self.model.kind,
             "scheduler": scheduler_name(self.scheduler), **self.backend.describe()}
        if self.loras is not None and self.loras.active:
            d["loras"] = [str(r) for r in self.loras.active]
        return d
