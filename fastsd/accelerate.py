"""`fastsd.accelerate(pipe)`: fastsd's speed-ups inside a diffusers pipeline the user already has.

    pipe = StableDiffusionPipeline.from_pretrained(...)      # or Img2Img, Inpaint, ControlNet, SDXL, ...
    fastsd.accelerate(pipe, profile="fast")                  # the same object; its UNet, ControlNet and VAE
    image = pipe("a red cube", num_inference_steps=25).images[0]     # calls now go through fastsd
    fastsd.deaccelerate(pipe)                                # the plain pipeline again

The drop-in promise: change this one line and nothing else changes. accelerate never changes the user's
modules (their dtype, device, weights, attention processors and config stay as they are, so every diffusers
API on them works as before: `attn_processors`, `set_attn_processor`, `set_default_attn_processor`,
`save_pretrained`, `load_lora_weights`, `enable_freeu`, `pipe.to`, ...). It shadows only the `forward` of
the UNet and ControlNets and the VAE's `encode`/`decode` on the instances; each call is routed
(fastsd/dropin/calls.py) to a backend's runner (ONNX Runtime, OpenVINO: `fast` picks OpenVINO on a CPU with
AMX), the CUDA graph, or fastsd's compute copy of the module (fastsd/dropin/compute.py: the profile's
precision, fastsd's attention kernels, fused ops, channels_last, torch.compile, kept in step with what the
user does to the module), and to the user's own module where only it can run the call (hooks, gradients).
Outputs come back in the dtype diffusers returns; what did not take the fastest path is logged once."""
from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch

from . import backends, kernels
from .backends.torch import recipe
from .dropin import calls
from .dropin.state import AccelerateState, Wrapped
from .dropin.watch import look
from .errors import InvalidParameter
from .optimize import OptimizeConfig, config_from

log = logging.getLogger("fastsd")

STATE = "_fastsd_accelerate"
SCOPE = ("a maintained diffusers pipeline built on UNet2DConditionModel and AutoencoderKL (or a tiny VAE, "
         "AutoencoderTiny) (StableDiffusionPipeline, "
         "its Img2Img, Inpaint, InstructPix2Pix, Depth2Img, upscalers, ControlNet, T2I-Adapter, PAG, LCM, Marigold, "
         "unCLIP and SDXL pipelines); not AnimateDiff (its UNet is a UNetMotionModel) nor the pipelines diffusers "
         "deprecated (diffusers.pipelines.deprecated), which fastsd is not checked against")
DEPRECATED = "diffusers.pipelines.deprecated."


# -- the front door ------------------------------------------------------------------------------------
def accelerate(pipe, config: OptimizeConfig | None = None, *, profile: str | None = None, onnx_dir=None,
               **flags):
    """Route `pipe`'s UNet, ControlNet and VAE calls through fastsd and return `pipe`. `config` or `profile`
    ("exact", "fast", "fastest") pick the flags, as for `fastsd.optimize`; `flags` override either. The
    device is the pipeline's (accelerate never moves a module). An accelerated pipeline is deaccelerated
    first, so calling this again changes the configuration.

    onnx_dir: for backend="onnxruntime" or "openvino", an export of this pipeline's model (`fastsd export`);
    without it the UNet and VAE decoder are exported now (onnxruntime: to a temporary folder; openvino: into
    its cache folder, once per weights)."""
    _check_pipeline(pipe)
    if "keep_original_weights" in flags:
        raise InvalidParameter("keep_original_weights", flags["keep_original_weights"],
                               "nothing: accelerate no longer changes the pipeline's weights (it computes from a "
                               "copy), so there is nothing to keep")
    config = _config(config, profile, flags, pipe)
    if getattr(pipe, STATE, None) is not None:
        deaccelerate(pipe)
    device = torch.device(config.device)
    prec = recipe.precision(config, device)
    runners = {}
    if config.backend != "torch":
        runners = backends.lookup_module_runner(config.backend)(pipe, config, onnx_dir=onnx_dir)
    state = AccelerateState(config, kernels.choose_attention(config.attention, device, prec.denoiser),
                            prec.cpu_recipe, runners=runners)
    state.applied.append(f"attention={state.attention}")
    if prec.cpu_recipe:
        state.applied.append("cpu_recipe")
    state.applied += [f"{config.backend}({name})" for name in runners]
    if config.compile:
        state.applied.append("compile")
    if config.cuda_graphs:
        ok, why = kernels.cuda_graphs_available(device)
        if ok:
            state.graph_factory = functools.partial(kernels.CUDAGraphRunner, device=device)
            state.applied.append("cuda_graphs(unet)")
        else:
            log.warning("cuda_graphs off: %s", why)
    for role in ("text_encoder", "text_encoder_2", "image_encoder", "safety_checker"):
        m = getattr(pipe, role, None)
        if isinstance(m, torch.nn.Module):  # they run as the user has them: cheap, and their error reaches every step
            state.untouched[role] = look(m, weights=False).dtype
    nets = _controlnets(pipe)
    for role, what, m, wanted in [("unet", "UNet", pipe.unet, prec.denoiser),
                                  *[("controlnet", "ControlNet" + (f" {i}" if len(nets) > 1 else ""), c, prec.denoiser)
                                    for i, c in enumerate(nets)],
                                  ("vae", "VAE", pipe.vae, prec.vae)]:
        w = Wrapped(role, what, m, look(m), wanted)
        if role == "vae":
            w.install("decode", functools.partial(calls.vae_decode, state, w))
            w.install("encode", functools.partial(calls.vae_encode, state, w))
        else:
            w.install("forward", functools.partial(calls.denoiser_forward, state, w))
        state.wrapped.append(w)
    object.__setattr__(pipe, STATE, state)
    for w in state.wrapped:  # the copies now where they will run (runners: only when a call needs one)
        if not (runners and w.role in ("unet", "vae")):
            now = look(w.module, tuple(w.own.values()))
            if not (now.hooks or now.odd):  # else the first call that can use one makes it
                calls.ensure_copy(state, w, now)
    log.info("fastsd.accelerate %s: %s", type(pipe).__name__, state.describe())
    return pipe


def deaccelerate(pipe):
    """Undo `accelerate`: the modules' own methods again, the compute copies dropped. Returns `pipe`. A
    pipeline that is not accelerated is returned unchanged."""
    state = getattr(pipe, STATE, None)
    if state is None:
        return pipe
    state.active = False
    for w in state.wrapped:
        w.uninstall()
    if state.graphs is not None:
        state.graphs.clear()
    state.graphs = None
    object.__setattr__(pipe, STATE, None)
    return pipe


restore = deaccelerate  # the name earlier releases documented


def accelerated(pipe) -> AccelerateState | None:
    """The state of an accelerated pipeline, or None."""
    return getattr(pipe, STATE, None)


# -- configuration and checks ---------------------------------------------------------------------------
def _config(config, profile, flags, pipe) -> OptimizeConfig:
    flags = dict(flags)
    where = _device_of(pipe.unet)
    if "device" not in flags and (config is None or config.device == "auto"):
        flags["device"] = str(where)  # the profile's flags for the device the pipeline is on
    explicit_backend = "backend" in flags or config is not None
    config = config_from(config, profile, flags, what="accelerate")
    if not _same_device(torch.device(config.device) if config.device != "auto" else where, where):
        raise InvalidParameter("device", config.device, f"{where}, the pipeline's device (accelerate computes where "
                               "the pipeline is; move it with pipe.to(...) first)")
    if config.backend != "torch" and not explicit_backend:  # `fast` picks openvino on AMX CPUs
        why = None
        if config.backend not in backends.module_runner_names():
            why = "which has no module runner for a diffusers pipeline"
        elif not _fp32_on_cpu(pipe):
            why = "whose export needs the pipeline's UNet and VAE in fp32 on the CPU"
        if why:
            log.info("accelerate: profile %s picks the %s backend, %s; its torch flags are used instead",
                     profile, config.backend, why)
            config = replace(config, backend="torch")
    if config.backend != "torch":  # the backend's module runners (fastsd/backends/<name>/runners.py)
        backends.lookup_module_runner(config.backend)
        return replace(replace(config, backend="torch").validated(), backend=config.backend)
    return config.validated()


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _fp32_on_cpu(pipe) -> bool:
    mods = [pipe.unet, pipe.vae]
    return all(look(m, weights=False).dtype == torch.float32 and _device_of(m).type == "cpu" for m in mods)


def _check_pipeline(pipe) -> None:
    """InvalidParameter for a pipeline out of the drop-in's scope (SCOPE; tests/test_accelerate_pipelines.py
    builds and runs every class in it, and checks that the others are refused)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    got = type(pipe).__name__
    if type(pipe).__module__.startswith(DEPRECATED):
        raise InvalidParameter("pipe", f"{got} (deprecated by diffusers)", SCOPE)
    components = getattr(pipe, "__dict__", {}).get("_internal_dict") or {}
    old = sorted(k for k in components if type(getattr(pipe, k, None)).__module__.startswith(DEPRECATED))
    if old:  # BlipDiffusionControlNetPipeline: BLIP-Diffusion's parts live in the deprecated package
        raise InvalidParameter("pipe", f"{got} (its {', '.join(old)} from diffusers' deprecated pipelines)", SCOPE)
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if not isinstance(unet, UNet2DConditionModel) or not isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
        if unet is not None and not isinstance(unet, UNet2DConditionModel):
            got += f" (its unet is a {type(unet).__name__})"
        elif vae is not None and not isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
            got += f" (its vae is a {type(vae).__name__})"
        raise InvalidParameter("pipe", got, SCOPE)


def _controlnets(pipe) -> list:
    cn = getattr(pipe, "controlnet", None)
    if not isinstance(cn, torch.nn.Module):
        return []
    nets = getattr(cn, "nets", None)  # MultiControlNetModel holds several
    return list(nets) if nets is not None else [cn]


def _device_of(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
