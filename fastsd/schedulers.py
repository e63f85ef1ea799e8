"""Scheduler names the CLI accepts, mapped to diffusers' scheduler classes."""
from __future__ import annotations

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import InvalidParameter

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M) is this class's default algorithm
    "lms": LMSDiscreteScheduler,
}


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
