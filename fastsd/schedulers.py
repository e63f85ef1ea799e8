"""Scheduler names the CLI accepts, mapped to diffusers' scheduler classes.

A named scheduler is built from the model's own scheduler config (`from_config`: its betas, prediction type,
timestep spacing), as diffusers' documentation switches schedulers. The few-step samplers keep their own
timestep logic: `lcm` (LCMScheduler) and `tcd` (TCDScheduler) pick their timesteps from a grid of
`original_inference_steps` (50 by default) distillation steps, exactly as diffusers computes them, so they
take at most that many steps."""
from __future__ import annotations

import inspect

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, TCDScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import InvalidParameter

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M) is this class's default algorithm
    "lms": LMSDiscreteScheduler,
    "lcm": LCMScheduler,  # latent consistency: LCM-LoRA / LCM-distilled models, 2-8 steps, guidance 1-2
    "tcd": TCDScheduler,  # trajectory consistency: TCD-LoRA models; --eta is its gamma
}
FEW_STEP = ("lcm", "tcd")


def scheduler_name(scheduler: SchedulerMixin) -> str:
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise InvalidParameter("scheduler", name, ", ".join(SCHEDULERS))
    return name


def make_scheduler(name: str, base_config) -> SchedulerMixin:
    """A fresh scheduler of the named kind that keeps the model's betas and prediction type."""
    return SCHEDULERS[check_scheduler(name)].from_config(base_config)


def check_steps(scheduler: SchedulerMixin, steps: int) -> int:
    """The steps this scheduler can take: a consistency sampler (LCM, TCD) picks its timesteps from its
    `original_inference_steps` grid, so it takes no more than that (diffusers raises a ValueError deep inside
    set_timesteps otherwise)."""
    limit = getattr(scheduler.config, "original_inference_steps", None)
    if limit is not None and steps > int(limit):
        raise InvalidParameter("steps", steps, f"an integer in [1, {int(limit)}] with the {scheduler_name(scheduler)} "
                               f"scheduler (it picks its timesteps from {int(limit)} original_inference_steps; 2-8 is "
                               "its usual range)")
    return steps


def takes_eta(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's step reads `eta` (DDIM's eta, TCD's gamma), as diffusers' pipelines decide it."""
    return "eta" in inspect.signature(scheduler.step).parameters
