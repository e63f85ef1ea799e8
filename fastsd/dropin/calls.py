"""The calls of an accelerated pipeline's modules: each wrapped `forward` (UNet, ControlNet) and the VAE's
`decode`/`encode` go, per call, to the fastest path that computes what diffusers would:

1. the user's own module, untouched ("plain"), when only it can: hooks on it (layerwise casting, layer
   skipping, CPU offload, forward hooks), gradients that must reach its parameters, float8 weights;
2. a backend's runner (OpenVINO, ONNX Runtime: "runner") when the call and the module are as the graph was
   exported: plain inputs, the same weights, submodules, attention maths and settings;
3. the CUDA graph of the UNet's compute copy ("graph"), for plain calls;
4. the compute copy (compute.py, "torch"), kept in step with the user's module.

Inputs go to the path in its dtype; outputs come back in the dtype of the user's module, as diffusers
returns them. Every time a call does not take the fastest path the reason is logged, once."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..backends.runners import Refused, extra_inputs
from .compute import ComputeCopy, takes
from .state import AccelerateState, Wrapped
from .watch import changed_settings, describe_settings, look


# VAE settings the decoder runner honours: slicing (one latent at a time), the tiling switch checked before
# it and the tile sizes (they matter only with tiling on)
VAE_HONOURED = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


# what diffusers' fuse_lora leaves on the UNet for its merge; the fused weights are what changes the output
MERGE_ONLY = ("lora_scale", "_safe_fusing")


def cast(x, dtype):
    """Floating tensors in x (nested in tuples, lists, dicts, diffusers outputs) to dtype."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, (tuple, list)):
        return type(x)(cast(v, dtype) for v in x)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    if isinstance(x, DiagonalGaussianDistribution):
        return DiagonalGaussianDistribution(x.parameters.to(dtype), deterministic=x.deterministic)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # diffusers' BaseOutput
        return type(x)(**{f.name: cast(getattr(x, f.name), dtype) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: cast(v, dtype) for k, v in x.items()}
    return x


def aside(now) -> str | None:
    """Why only the user's own module can run this call, or None."""
    if now.hooks:
        return ("runs as the user's module (hooks act there only): " + "; ".join(now.hooks[:3])
                + (f" and {len(now.hooks) - 3} more" if len(now.hooks) > 3 else ""))
    if now.grads:
        return "runs as the user's module: gradients are enabled and reach its parameters only"
    if now.odd:
        return f"runs as the user's module: its weights are stored in {', '.join(now.odd)}"
    return None


def ensure_copy(state: AccelerateState, w: Wrapped, now) -> ComputeCopy:
    c = w.copy
    if c is not None and c.stale(now):
        state.note(w.what, "changed since its compute copy was made (weights, submodules, dtype or device): "
                   "converting it again", logging.INFO)
        w.copy = c = None
    if c is None:
        if w.wanted != torch.float32 and now.dtype not in (torch.float32, w.wanted):
            state.note(w.what, f"is {str(now.dtype)[6:]}: fastsd computes it in {str(now.dtype)[6:]}, not the "
                       f"{str(w.wanted)[6:]} the configuration asks for (it keeps the precision of a pipeline "
                       "that is not fp32)")
        c = w.copy = ComputeCopy(w.module, w.role, state.config, now, attention=state.attention, wanted=w.wanted,
                                 cpu_recipe=state.cpu_recipe, own=w.own)
        if w.role == "unet" and state.graph_factory is not None:
            state.graphs = state.graph_factory(_graph_fn(c))
    elif c.sync(now) and w.role == "unet" and state.graphs is not None:
        state.graphs.clear()  # captured with the copy's former processors or settings: capture again
    return c


def _graph_fn(c: ComputeCopy):
    def fn(sample, timestep, encoder_hidden_states):
        return c.forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return fn


def _runner_refusal(state: AccelerateState, w: Wrapped, now, allowed=()) -> str | None:
    """Why the backend's graph, exported from the module as it was at accelerate, cannot stand for it now."""
    start = w.start
    if now.structure != start.structure:
        if getattr(w.module, "_hf_peft_config_loaded", False):
            return f"LoRA adapters are loaded in the torch {w.what}; the {state.config.backend} graph has none"
        return f"its submodules changed since accelerate (fused QKV? adapters?); the {state.config.backend} graph " \
               "has the exported ones"
    if (now.dtype, now.device) != (start.dtype, start.device):
        return f"it was cast or moved since accelerate (now {str(now.dtype)[6:]} on {now.device})"
    if not now.same_weights(start):
        return f"the torch {w.what}'s weights changed since the export (a LoRA fused into them?); call " \
               "fastsd.accelerate again to re-export"
    other = sorted({type(p).__name__ for n, p in now.processors.items()
                    if p is not start.processors.get(n) and not takes(p, exact=False)})
    if other:
        return f"attention processors {', '.join(other)} are set (PAG, IP-Adapter, custom); the graph has plain attention"
    changed = [c for c in changed_settings(start.settings, now.settings) if c not in allowed + MERGE_ONLY]
    if changed:
        return describe_settings(changed)
    return None


def denoiser_forward(state: AccelerateState, w: Wrapped, *args, **kwargs):
    """forward(sample, timestep, encoder_hidden_states, ..., return_dict) of a UNet or ControlNet."""
    if not state.active:
        return w.original("forward")(*args, **kwargs)
    now = look(w.module, tuple(w.own.values()))
    why = aside(now)
    if why:
        state.note(w.what, why)
        state.count(w, "plain")
        return w.original("forward")(*args, **kwargs)
    rest = list(args)
    sample = rest.pop(0) if rest else kwargs.pop("sample")
    timestep = rest.pop(0) if rest else kwargs.pop("timestep")
    return_dict = kwargs.pop("return_dict", True)
    if w.role == "unet":
        out = _unet_fast_path(state, w, now, sample, timestep, rest, kwargs)
        if out is not None:
            out = out.to(now.dtype)
            if return_dict:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
                return UNet2DConditionOutput(sample=out)
            return (out,)
    c = ensure_copy(state, w, now)
    state.count(w, "torch")
    out = c.forward(cast(sample, c.dtype), timestep, *cast(rest, c.dtype), return_dict=return_dict,
                    **cast(kwargs, c.dtype))
    return cast(out, now.dtype)


def _unet_fast_path(state: AccelerateState, w: Wrapped, now, sample, timestep, args, kwargs):
    """The runner's or the CUDA graph's output for a call they can take, else None (the compute copy runs it)."""
    if args:
        hidden, rest = args[0], args[1:]
        positional = [f"positional argument {i + 4}" for i, a in enumerate(rest) if a is not None]
    else:
        hidden, positional = kwargs.get("encoder_hidden_states"), []
    others = {k: v for k, v in kwargs.items() if k != "encoder_hidden_states"}
    extra = positional + extra_inputs(others)
    runner = state.runners.get("unet")
    if runner is not None:
        why = _runner_refusal(state, w, now)
        if why is None and positional:
            why = "the graph takes sample, timestep and encoder_hidden_states only, not " + ", ".join(positional)
        if why is None:
            try:
                out = runner(sample, timestep, hidden, **others)
                state.count(w, "runner")
                return out
            except Refused as e:
                why = f"{state.config.backend} cannot take it: {e}"
        state.note(w.what, f"runs in torch for this call: {why}")
    if state.graph_factory is not None:
        if extra:
            state.note(w.what, "runs eagerly: CUDA graphs take only sample, timestep and encoder_hidden_states, "
                       "not " + ", ".join(extra))
        elif getattr(w.module, "_hf_peft_config_loaded", False):
            state.note(w.what, "runs eagerly: LoRA adapters are loaded (a captured graph would freeze their scales)")
        else:
            c = ensure_copy(state, w, now)
            out = state.graphs(sample.to(c.dtype), timestep, hidden.to(c.dtype))
            state.count(w, "graph")
            return out
    return None


def vae_decode(state: AccelerateState, w: Wrapped, z, *args, **kwargs):
    vae = w.module
    if not state.active:
        return w.original("decode")(z, *args, **kwargs)
    now = look(vae, tuple(w.own.values()))
    why = aside(now)
    if why:
        state.note(w.what, why)
        state.count(w, "plain")
        return w.original("decode")(z, *args, **kwargs)
    runner = state.runners.get("vae_decoder")
    if runner is not None:
        why = "tiling is on (the graph decodes whole latents)" if vae.use_tiling else \
            _runner_refusal(state, w, now, allowed=VAE_HONOURED)
        if why is None:
            try:
                plain = {k: v for k, v in kwargs.items() if k != "return_dict"}
                # slicing: one latent at a time, as diffusers' decode does
                parts = z.split(1) if vae.use_slicing and z.shape[0] > 1 else [z]
                image = torch.cat([runner(p, *args, **plain) for p in parts]).to(now.dtype)
                state.count(w, "runner")
                if kwargs.get("return_dict", True):
                    from diffusers.models.autoencoders.vae import DecoderOutput
                    return DecoderOutput(sample=image)
                return (image,)
            except Refused as e:
                why = str(e)
        state.note(w.what, f"decoder runs in torch for this call: {why}")
    c = ensure_copy(state, w, now)
    state.count(w, "torch")
    out = type(vae).decode(c.module, cast(z, c.dtype), *args, **kwargs)
    return cast(out, now.dtype)


def vae_encode(state: AccelerateState, w: Wrapped, x, *args, **kwargs):
    vae = w.module
    if not state.active:
        return w.original("encode")(x, *args, **kwargs)
    now = look(vae, tuple(w.own.values()))
    why = aside(now)
    if why:
        state.note(w.what, why)
        state.count(w, "plain")
        return w.original("encode")(x, *args, **kwargs)
    c = ensure_copy(state, w, now)
    state.count(w, "torch")
    return cast(type(vae).encode(c.module, cast(x, c.dtype), *args, **kwargs), now.dtype)
