"""Module runners: a backend that runs the UNet (or the VAE decoder) of a diffusers pipeline in place of
its torch module, for `fastsd.accelerate(pipe, backend=...)`.

A runner factory, named in the backend registry (fastsd/backends/__init__.py), is called as `factory(pipe, config, **options)` and
returns `{"unet": runner, "vae_decoder": runner}` (either may be missing). A runner is called with the
module's own signature,

    unet runner:        runner(sample, timestep, encoder_hidden_states, **other_forward_kwargs) -> Tensor
    vae_decoder runner: runner(latents, **other_decode_kwargs) -> Tensor (the image in [-1, 1])

and raises `Refused(reason)` for a call it cannot take (ControlNet residuals, added_cond_kwargs, a shape
outside its export, ...): the accelerated module then runs that call in torch and logs the reason once.
`describe()` says what the runner is. ONNX Runtime's runners are in onnxruntime/runners.py, OpenVINO's in
openvino/runners.py; another backend names its factory in the registry (fastsd.backends.register_backend).
What every runner over an exported graph checks before a call (the plain inputs only, one timestep, the
torch module's weights unchanged since the export, an export of this model) is here, shared."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidParameter, ModelLoadError
from ..model import SDModel

# the config entries that fix a graph's architecture: an export of another model is refused up front
UNET_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels", "sample_size")
VAE_KEYS = ("latent_channels", "block_out_channels")


class Refused(Exception):
    """This call has an input the runner cannot take; the reason is logged once and torch runs it."""


def extra_inputs(kwargs: dict) -> list[str]:
    """The names of keyword inputs that carry something (not None, not empty): what a graph exported
    with only the plain inputs cannot take."""
    out = []
    for k, v in kwargs.items():
        if v is None or (isinstance(v, (dict, list, tuple)) and len(v) == 0):
            continue
        out.append(k)
    return out


def plain_unet_timestep(timestep, kwargs: dict) -> float:
    """The one timestep of a UNet call a graph exported with (sample, timestep, encoder_hidden_states) can
    take; Refused when the call carries more (ControlNet residuals, added_cond_kwargs, cross_attention_kwargs,
    ...) or a different timestep per image."""
    extra = extra_inputs(kwargs)
    if extra:
        raise Refused(f"the graph takes sample, timestep and encoder_hidden_states only, not {', '.join(extra)}")
    t = torch.as_tensor(timestep)
    if t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all()):
        raise Refused("a different timestep per image (the graph takes one)")
    return float(t.reshape(-1)[0])


def check_plain_decode(args: tuple, kwargs: dict) -> None:
    """Refused when a VAE decode carries more than the latents (generator aside: decoding is deterministic)."""
    extra = extra_inputs({k: v for k, v in kwargs.items() if k != "generator"}) + [
        f"positional argument {i + 2}" for i, a in enumerate(args) if a is not None]
    if extra:
        raise Refused(f"the graph takes the latents only, not {', '.join(extra)}")


def _fingerprint(module) -> torch.Tensor:
    # the first values of every weight: in-place changes through .data (peft's merge) bump no version counter
    return torch.cat([p.detach().reshape(-1)[:4].float().cpu() for p in module.parameters()])


class WeightsWatch:
    """Refuses a call once the torch module's weights differ from those at its first call (a LoRA fused into
    them, say): the graph still holds the exported ones."""

    def __init__(self, module, what: str):
        self.module, self.what = module, what
        self._weights = None

    def check(self) -> None:
        now = _fingerprint(self.module)
        if self._weights is None:  # taken at the first call, after accelerate converted the module
            self._weights = now
        elif not torch.equal(now, self._weights):
            raise Refused(f"the torch {self.what}'s weights changed since the export (a LoRA fused into them?); "
                          "call fastsd.accelerate again to re-export")


def check_export_config(folder: Path, comp: str, module, keys) -> None:
    """InvalidParameter when `folder`'s `comp` was exported from a model of another architecture."""
    f = Path(folder) / comp / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        raise ModelLoadError(f"onnx_dir: {folder} has no readable {comp}/config.json (not a fastsd export?)") from None
    for k in keys:
        mine, theirs = module.config.get(k), cfg.get(k)
        if theirs is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
            raise InvalidParameter("onnx_dir", str(folder), f"an export of this pipeline's model ({comp} {k} is "
                                   f"{theirs} there, {mine} here)")


def export_dtype(folder: Path) -> str:
    """The dtype an export was written in (fastsd_export.json; fp32 when it does not say)."""
    f = Path(folder) / "fastsd_export.json"
    return json.loads(f.read_text()).get("dtype", "fp32") if f.is_file() else "fp32"


def pipeline_model(pipe):
    """The pipeline's modules as the SDModel the exporter takes. One name for every pipeline class, so that
    the text-to-image, image-to-image and inpainting pipelines over the same weights share one export. A
    pipeline's optional parts may be absent (no text encoder or tokenizer: prompt_embeds-only use)."""
    return SDModel("diffusers-pipeline", "pipeline", getattr(pipe, "tokenizer", None),
                   getattr(pipe, "text_encoder", None), pipe.unet, pipe.vae, pipe.scheduler)
