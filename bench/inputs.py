"""The inputs `fastsd bench` feeds every configuration alike: seeded tensors per batch size, the image task's
image and mask, and how many UNet calls and VAE encodes a generation makes."""
from __future__ import annotations

import numpy as np
import torch

from fastsd import tasks
from fastsd.errors import InvalidParameter
from fastsd.schedulers import make_scheduler, scheduler_name
from fastsd.tasks import ImageToImage
from fastsd.verify import sample_inputs

from .settings import BenchSettings


def unet_calls(model, steps: int, scheduler: str | None, task: str = "text2img",
               strength: float | None = None) -> tuple[int, str, object]:
    """How many UNet calls `steps` denoising steps make (PNDM makes steps + 1; image-to-image and
    inpainting start later, at the step `strength` picks), the scheduler's name, and the timestep in the
    middle of the schedule."""
    sched = make_scheduler(scheduler, model.scheduler.config) if scheduler else \
        type(model.scheduler).from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    if task != "text2img":  # the engine's own start step (diffusers' get_timesteps), on this copy of the scheduler
        ts = ImageToImage(None, strength, 1.0).start_timesteps(sched, steps)
    return len(ts), scheduler_name(sched), ts[len(ts) // 2]


def task_inputs(model, task: str, strength, height: int, width: int) -> dict:
    """The image task's inputs, the same for every configuration: verify's drawn image (a red disc on blue)
    and mask (the top-left quarter) at the bench's size, and the strength; {} for text-to-image. A task
    this model cannot run is an InvalidParameter naming it."""
    if task not in tasks.TASKS:
        raise InvalidParameter("task", task, ", ".join(tasks.TASKS))
    channels = model.unet.config.in_channels
    if channels == 9 and task != "inpaint":
        raise InvalidParameter("task", task, "inpaint: this model has a 9-channel inpainting UNet, which "
                               "text-to-image and image-to-image pipelines cannot run")
    if task == "text2img":
        if strength is not None:
            raise InvalidParameter("strength", strength, "only with --task img2img or inpaint")
        return {}
    image, mask = sample_inputs(task, height, width)
    strength = tasks.strength_value(strength, task == "inpaint")
    tasks.check_inputs(image, mask, strength, channels)
    return {"image": image, "mask_image": mask, "strength": strength}


def task_arguments(s: BenchSettings, batch: int) -> dict:
    """The image / mask / strength arguments of one end-to-end call (both runners take the same), one image
    per generated image."""
    if not s.task_inputs:
        return {}
    x = s.task_inputs
    out = {"image": [x["image"]] * batch, "strength": x["strength"]}
    if x["mask_image"] is not None:
        out["mask_image"] = [x["mask_image"]] * batch
    return out


def vae_encodes(task: str, nine_channels: bool, strength: float | None, baseline: bool) -> int:
    """VAE encodes per generation: the image (image-to-image; inpainting on a 4-channel UNet, or below full
    strength) and the masked image (inpainting: diffusers always encodes it; fastsd only for a 9-channel UNet,
    the one that reads it)."""
    if task == "text2img":
        return 0
    if task == "img2img":
        return 1
    image = 1 if not nine_channels or strength < 1.0 else 0
    return image + (1 if baseline or nine_channels else 0)


def make_inputs(model, s: BenchSettings, batch: int, height: int, width: int, device) -> tuple[dict, dict]:
    """Seeded inputs of one batch size, the same for every configuration, and their shapes."""
    cfg = s.guidance > 1.0 and model.unet.config.time_cond_proj_dim is None
    n_text = 2 * batch if cfg else batch
    tok = model.tokenizer
    texts = ([s.negative] * batch if cfg else []) + [s.prompt] * batch
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    g = torch.Generator("cpu").manual_seed(s.seed)
    f = model.vae_scale_factor
    lat = (model.unet.config.in_channels, height // f, width // f)
    _, _, t = unet_calls(model, s.steps, s.scheduler)
    inputs = {
        "ids": ids,
        "sample": torch.randn((n_text, *lat), generator=g),
        "t": t,
        "hidden": torch.randn((n_text, ids.shape[1], model.unet.config.cross_attention_dim), generator=g),
        "latents": torch.randn((batch, model.vae.config.latent_channels, *lat[1:]), generator=g),
        "image": torch.rand((batch, 3, height, width), generator=g) * 2 - 1,
    }
    if s.task_inputs:  # the VAE encoder's input: the task's image, as the pipelines preprocess it, per image
        pixels = torch.from_numpy(np.asarray(s.task_inputs["image"].convert("RGB"), dtype=np.float32))
        inputs["pixels"] = (pixels.permute(2, 0, 1) / 127.5 - 1.0).unsqueeze(0).repeat(batch, 1, 1, 1)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "t" else v) for k, v in inputs.items()}
    shapes = {
        "images_per_call": batch, "guidance_batched": cfg,
        "text_encoder": {"input_ids": list(ids.shape)},
        "unet_step": {"sample": list(inputs["sample"].shape), "encoder_hidden_states": list(inputs["hidden"].shape),
                      "timestep": int(t)},
        "vae_decode": {"latents": list(inputs["latents"].shape), "image": [batch, 3, height, width]},
        "safety_checker": {"image": [batch, 3, height, width]},
        "end_to_end": {"prompts": 1, "images": batch, "steps": s.steps, "height": height, "width": width},
    }
    if s.task_inputs:
        shapes["vae_encode"] = {"image": [batch, 3, height, width],
                                "latent_parameters": [batch, 2 * model.vae.config.latent_channels, *lat[1:]]}
        shapes["end_to_end"].update(task=s.task, strength=s.task_inputs["strength"],
                                    mask=s.task_inputs["mask_image"] is not None)
    return inputs, shapes
