"""`fastsd.accelerate(pipe)`: fastsd's speed-ups inside a diffusers pipeline the user already has.

    pipe = StableDiffusionPipeline.from_pretrained(...)      # or Img2Img, Inpaint, ControlNet, ...
    fastsd.accelerate(pipe, profile="fast")                  # the same object, its modules taken over
    image = pipe("a red cube", num_inference_steps=25).images[0]
    fastsd.restore(pipe)                                     # the plain pipeline again

The pipeline keeps its class, its call and its other methods; accelerate changes its modules in place,
as `optimize` does for the engine: device and dtype (the CPU bf16 recipe: UNet, ControlNet and VAE in bf16
channels_last, the text encoder in fp32), fastsd's attention processors (kernels/), the fused GroupNorm+SiLU
and GEGLU ops, channels_last, torch.compile, CUDA graphs per shape, or a backend's module runner (ONNX
Runtime, OpenVINO: `fast` picks OpenVINO on a CPU with AMX) in place of the torch UNet and VAE decoder. Each module's `forward` (the VAE's `encode`/`decode`)
is wrapped on the instance: it casts inputs to the module's compute dtype and the outputs back to the
caller's, so the pipeline's own dtype logic is untouched, and it sends each call to the runner, the CUDA
graph or eager torch. A call a runner or a graph cannot take (ControlNet residuals, added_cond_kwargs,
LoRA adapters, a new shape) runs in torch, and the reason is logged once.

What diffusers does to a module keeps working: `pipe.to`, `enable_attention_slicing` (fastsd's processor
slices; diffusers' sliced processor would replace it), `enable_vae_tiling`, `load_lora_weights` (peft
wraps the same Linear/Conv modules fastsd's code calls), `save_pretrained` (writes the weights as they
were before accelerate: dtype changes keep the original tensors, see `keep_original_weights`)."""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field, replace

import torch

from . import backends, kernels
from .backends.runners import Refused, extra_inputs
from .backends.torch import recipe
from .errors import InvalidParameter
from .optimize import OptimizeConfig, config_from

log = logging.getLogger("fastsd")

STATE = "_fastsd_accelerate"
_OVERRIDES = ("forward", "encode", "decode", "set_attention_slice", "save_pretrained")


@dataclass
class _Taken:
    """One module accelerate changed, and what it needs to undo it."""
    role: str  # unet | controlnet | vae | text_encoder | safety_checker | image_encoder
    module: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    channels_last: bool = False  # accelerate converted it
    processors: dict | None = None  # the attention processors before
    originals: list | None = None  # (submodule, "_parameters"|"_buffers", name, tensor) before a dtype change
    overrides: list = field(default_factory=list)  # attribute names set on the instance


@dataclass
class AccelerateState:
    """What `accelerate` did to a pipeline (`pipe._fastsd_accelerate`); `describe()` for people."""
    config: OptimizeConfig
    taken: list
    applied: list
    attention: str
    dtypes: dict
    runners: dict = field(default_factory=dict)  # "unet"/"vae_decoder" -> module runner
    graphs: object = None  # kernels.CUDAGraphRunner for the UNet
    compiled: dict = field(default_factory=dict)  # id(module) -> compiled forward
    logged: set = field(default_factory=set)
    calls: dict = field(default_factory=lambda: {"runner": 0, "graph": 0, "torch": 0})

    def note(self, what: str, reason: str) -> None:
        """Log, once per (what, reason), why a call went to torch."""
        if (what, reason) not in self.logged:
            self.logged.add((what, reason))
            log.warning("fastsd.accelerate: %s runs in torch for this call: %s", what, reason)

    def describe(self) -> dict:
        dtypes = {k: str(v).replace("torch.", "") for k, v in self.dtypes.items()}
        return {"device": self.config.device, "dtypes": dtypes,
                "attention": self.attention, "applied": list(self.applied), "backend": self.config.backend,
                "runners": {k: r.describe() for k, r in self.runners.items()}, "calls": dict(self.calls)}


# -- the front door ------------------------------------------------------------------------------------
def accelerate(pipe, config: OptimizeConfig | None = None, *, profile: str | None = None,
               keep_original_weights: bool = True, onnx_dir=None, **flags):
    """Take over `pipe`'s modules in place and return `pipe`. `config` or `profile` ("exact", "fast",
    "fastest") pick the flags, as for `fastsd.optimize`; `flags` override either. An accelerated pipeline
    is restored first, so calling this again changes the configuration.

    keep_original_weights: when the dtype changes, keep the original tensors so that `restore` and
    `save_pretrained` give them back exactly (costs their memory: +1x the FP32 weights of UNet and VAE
    beside the bf16 ones); False frees them, and `restore` casts back (bf16-rounded weights).
    onnx_dir: for backend="onnxruntime" or "openvino", an export of this pipeline's model (`fastsd export`);
    without it the UNet and VAE decoder are exported now (onnxruntime: to a temporary folder; openvino: into
    its cache folder, once per weights)."""
    _check_pipeline(pipe)
    config = _config(config, profile, flags, pipe)
    if getattr(pipe, STATE, None) is not None:
        restore(pipe)
    runners = {}
    if config.backend != "torch":
        runners = backends.lookup_module_runner(config.backend)(pipe, config, onnx_dir=onnx_dir)
    state = _take_over(pipe, config, keep_original_weights)
    state.runners = runners
    for name in runners:
        state.applied.append(f"{config.backend}({name})")
    object.__setattr__(pipe, STATE, state)
    if config.attention_slicing == "on":
        pipe.enable_attention_slicing()
    if config.vae_tiling == "on":
        pipe.vae.enable_tiling()
    log.info("fastsd.accelerate %s: %s", type(pipe).__name__, state.describe())
    return pipe


def restore(pipe):
    """Undo `accelerate`: the modules' original dtype, device, memory format, attention processors and
    methods. Returns `pipe`. A pipeline that is not accelerated is returned unchanged."""
    state = getattr(pipe, STATE, None)
    if state is None:
        return pipe
    for t in state.taken:
        m = t.module
        for name in t.overrides:
            m.__dict__.pop(name, None)
        if t.role in ("unet", "controlnet", "vae"):
            kernels.remove_fused_ops(m)
        if t.processors is not None:
            try:
                m.set_attn_processor(t.processors)
            except ValueError:  # the module's attention layers changed since (they were replaced by the user)
                m.set_default_attn_processor()
        if t.originals is not None:
            for sub, kind, name, tensor in t.originals:
                held = getattr(sub, kind).get(name)
                if held is not None:
                    held.data = tensor
        elif t.channels_last:
            m.to(memory_format=torch.contiguous_format)
        m.to(t.device, t.dtype)  # also what the user added since (LoRA layers), to the original dtype
    if state.graphs is not None:
        state.graphs.clear()
    object.__setattr__(pipe, STATE, None)
    return pipe


def accelerated(pipe) -> AccelerateState | None:
    """The state of an accelerated pipeline, or None."""
    return getattr(pipe, STATE, None)


# -- configuration and checks ---------------------------------------------------------------------------
def _config(config, profile, flags, pipe=None) -> OptimizeConfig:
    explicit_backend = "backend" in flags or config is not None
    config = config_from(config, profile, flags, what="accelerate")
    if config.backend != "torch" and not explicit_backend:  # `fast` picks openvino on AMX CPUs
        why = None
        if config.backend not in backends.module_runner_names():
            why = "which has no module runner for a diffusers pipeline"
        elif pipe is not None and not _fp32_on_cpu(pipe):
            why = "whose export needs the pipeline's modules in fp32 on the CPU"
        if why:
            log.info("accelerate: profile %s picks the %s backend, %s; its torch flags are used instead",
                     profile, config.backend, why)
            config = replace(config, backend="torch")
    if config.backend != "torch":  # the backend's module runners (fastsd/backends/<name>/runners.py)
        backends.lookup_module_runner(config.backend)
        return replace(replace(config, backend="torch").validated(), backend=config.backend)
    return config.validated()


def _fp32_on_cpu(pipe) -> bool:
    mods = [m for m in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None)) if isinstance(m, torch.nn.Module)]
    return all(_dtype_of(m) == torch.float32 and _device_of(m).type == "cpu" for m in mods)


def _check_pipeline(pipe) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if not isinstance(unet, UNet2DConditionModel) or not isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
        raise InvalidParameter("pipe", type(pipe).__name__,
                               "a diffusers pipeline built on UNet2DConditionModel and AutoencoderKL (or a tiny VAE, "
                               "AutoencoderTiny) "
                               "(StableDiffusionPipeline, its Img2Img and Inpaint pipelines, "
                               "StableDiffusionControlNetPipeline, ...)")


def _controlnets(pipe) -> list:
    cn = getattr(pipe, "controlnet", None)
    if cn is None:
        return []
    nets = getattr(cn, "nets", None)  # MultiControlNetModel holds several
    return list(nets) if nets is not None else [cn]


def _dtype_of(module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _device_of(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- taking the modules over -----------------------------------------------------------------------------
def _take_over(pipe, config: OptimizeConfig, keep_originals: bool) -> AccelerateState:
    device = torch.device(config.device)
    prec = recipe.precision(config, device)
    dtype, vae_dtype, text_dtype, cpu_recipe = prec.denoiser, prec.vae, prec.text, prec.cpu_recipe
    if config.backend != "torch":  # the runner is what is fast; the torch fallback keeps the weights as given
        dtype = vae_dtype = torch.float32 if config.dtype == "fp32" else dtype
        text_dtype = text_dtype if cpu_recipe else dtype  # the bf16 CPU recipe's fp32 text encoder, as openvino's
    plan = [("unet", pipe.unet, dtype), *[("controlnet", c, dtype) for c in _controlnets(pipe)],
            ("vae", pipe.vae, vae_dtype)]
    for role in ("text_encoder", "safety_checker", "image_encoder"):
        m = getattr(pipe, role, None)
        if isinstance(m, torch.nn.Module):
            plan.append((role, m, text_dtype))
    state = AccelerateState(config, [], [], "", {"unet": dtype, "vae": vae_dtype, "text_encoder": text_dtype})
    for role, m, target in plan:
        t = _Taken(role, m, _dtype_of(m), _device_of(m))
        if t.dtype != target and keep_originals:
            t.originals = [(sub, kind, name, x.data) for sub in m.modules() for kind in ("_parameters", "_buffers")
                           for name, x in getattr(sub, kind).items() if x is not None]
        if role in ("unet", "controlnet", "vae") and hasattr(m, "attn_processors"):  # a tiny VAE has no attention
            t.processors = dict(m.attn_processors)
        m.to(device, target)
        state.taken.append(t)

    denoisers = [t for t in state.taken if t.role in ("unet", "controlnet")]
    vae = next(t for t in state.taken if t.role == "vae")
    # the same recipe as the engine's torch backend, but for the dtypes worked out above (a runner backend
    # keeps torch's weights as given); fused QKV is left out: diffusers' LoRA loader targets to_q/to_k/to_v
    done = recipe.install([t.module for t in denoisers], vae.module, config, device,
                          recipe.Precision(dtype, vae_dtype, text_dtype, cpu_recipe), fuse_qkv=False)
    state.attention = done.attention
    state.applied.append(f"attention={state.attention}")
    for t, ops in zip(denoisers, done.fused):
        state.applied += [f"{op}({t.role})" for op in ops]
    if done.channels_last:
        converted = [t for t in state.taken if any(t.module is m for m in done.channels_last)]
        for t in converted:
            t.channels_last = True
        state.applied.append(f"channels_last({', '.join(t.role for t in converted)})")
    if cpu_recipe:
        state.applied.append("cpu_recipe(text encoder fp32)")
    if config.compile:
        # no inductor weight freezing here (the engine freezes): the pipeline stays mutable, and frozen
        # weights would ignore a LoRA loaded or fused later
        for t in denoisers:
            state.compiled[id(t.module)] = torch.compile(type(t.module).forward.__get__(t.module))
        state.applied.append("compile")
    if config.cuda_graphs:
        ok, why = kernels.cuda_graphs_available(device)
        if ok:
            state.graphs = kernels.CUDAGraphRunner(_graph_fn(state, pipe.unet), device=device)
            state.applied.append("cuda_graphs(unet)")
        else:
            log.warning("cuda_graphs off: %s", why)
    for t in state.taken:
        _install_overrides(state, t)
    return state


def _graph_fn(state, unet):
    forward = state.compiled.get(id(unet)) or type(unet).forward.__get__(unet)

    def fn(sample, timestep, encoder_hidden_states):
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return fn


def _install_overrides(state: AccelerateState, t: _Taken) -> None:
    m = t.module

    def put(name, fn):
        m.__dict__[name] = fn  # an instance attribute shadows the class's method; restore deletes it
        t.overrides.append(name)

    if t.role in ("unet", "controlnet"):
        put("forward", functools.partial(_denoiser_forward, state, t))
        put("set_attention_slice", functools.partial(_set_attention_slice, state, t))
    elif t.role == "vae":
        put("decode", functools.partial(_vae_decode, state, t))
        put("encode", functools.partial(_vae_encode, state, t))
    if hasattr(m, "save_pretrained"):
        put("save_pretrained", functools.partial(_save_pretrained, t))


# -- the wrapped calls -------------------------------------------------------------------------------------
def _cast(x, dtype):
    """Floating tensors in x (nested in tuples, lists, dicts, diffusers outputs) to dtype."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    if isinstance(x, DiagonalGaussianDistribution):
        return DiagonalGaussianDistribution(x.parameters.to(dtype), deterministic=x.deterministic)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # diffusers' BaseOutput
        return type(x)(**{f.name: _cast(getattr(x, f.name), dtype) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def _caller_dtype(x) -> torch.dtype:
    return x.dtype if torch.is_tensor(x) and x.is_floating_point() else torch.float32


def _denoiser_forward(state: AccelerateState, t: _Taken, *args, **kwargs):
    """forward(sample, timestep, encoder_hidden_states, ..., return_dict) of a UNet or ControlNet."""
    m = t.module
    args = list(args)
    sample = args.pop(0) if args else kwargs.pop("sample")
    timestep = args.pop(0) if args else kwargs.pop("timestep")
    out_dtype = _caller_dtype(sample)
    dtype = _dtype_of(m)
    return_dict = kwargs.pop("return_dict", True)
    if t.role == "unet" and (state.runners.get("unet") is not None or state.graphs is not None):
        out = _unet_fast_path(state, m, sample, timestep, args, kwargs)
        if out is not None:
            out = out.to(out_dtype)
            if return_dict:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
                return UNet2DConditionOutput(sample=out)
            return (out,)
    state.calls["torch"] += t.role == "unet"
    forward = state.compiled.get(id(m)) or type(m).forward.__get__(m)
    out = forward(_cast(sample, dtype), timestep, *_cast(args, dtype), return_dict=return_dict,
                  **_cast(kwargs, dtype))
    return _cast(out, out_dtype)


def _peft_loaded(module) -> bool:
    return bool(getattr(module, "_hf_peft_config_loaded", False))


def _unet_fast_path(state: AccelerateState, unet, sample, timestep, args, kwargs):
    """The runner's or the CUDA graph's output for a call they can take, else None (torch runs it)."""
    if args:
        hidden, rest = args[0], args[1:]
        extra = [f"positional argument {i + 4}" for i, a in enumerate(rest) if a is not None]
    else:
        hidden, extra = kwargs.get("encoder_hidden_states"), []
    others = {k: v for k, v in kwargs.items() if k != "encoder_hidden_states"}
    extra += extra_inputs(others)
    runner = state.runners.get("unet")
    if runner is not None:
        if _peft_loaded(unet):
            state.note("UNet", f"LoRA adapters are loaded in the torch UNet; the {state.config.backend} graph has none")
        else:
            try:
                out = runner(sample, timestep, hidden, **others)
                state.calls["runner"] += 1
                return out
            except Refused as e:
                state.note("UNet", f"{state.config.backend} cannot take it: {e}")
    if state.graphs is not None:
        if extra:
            state.note("UNet", "CUDA graphs take only sample, timestep and encoder_hidden_states, not "
                       + ", ".join(extra))
        elif _peft_loaded(unet):
            state.note("UNet", "LoRA adapters are loaded: a captured graph would freeze their scales")
        elif torch.is_grad_enabled():
            state.note("UNet", "gradients are enabled (CUDA graphs run inference only)")
        else:
            dtype = _dtype_of(unet)
            out = state.graphs(sample.to(dtype), timestep, hidden.to(dtype))
            state.calls["graph"] += 1
            return out
    return None


def _vae_decode(state: AccelerateState, t: _Taken, z, *args, **kwargs):
    vae = t.module
    out_dtype = _caller_dtype(z)
    runner = state.runners.get("vae_decoder")
    if runner is not None:
        reason = ("VAE tiling is on" if vae.use_tiling else "VAE slicing is on" if vae.use_slicing else
                  "LoRA adapters are loaded in the torch VAE" if _peft_loaded(vae) else None)
        if reason is None:
            try:
                image = runner(z, *args, **{k: v for k, v in kwargs.items() if k != "return_dict"}).to(out_dtype)
                if kwargs.get("return_dict", True):
                    from diffusers.models.autoencoders.vae import DecoderOutput
                    return DecoderOutput(sample=image)
                return (image,)
            except Refused as e:
                reason = str(e)
        state.note("VAE decoder", reason)
    out = type(vae).decode(vae, _cast(z, _dtype_of(vae)), *args, **kwargs)
    return _cast(out, out_dtype)


def _vae_encode(state: AccelerateState, t: _Taken, x, *args, **kwargs):
    vae = t.module
    out = type(vae).encode(vae, _cast(x, _dtype_of(vae)), *args, **kwargs)
    return _cast(out, _caller_dtype(x))


def _set_attention_slice(state: AccelerateState, t: _Taken, slice_size):
    """diffusers' slicing installs its SlicedAttnProcessor; put fastsd's back with that slice size."""
    type(t.module).set_attention_slice(t.module, slice_size)
    kernels.install_attention(t.module, state.attention, device=_device_of(t.module), dtype=_dtype_of(t.module))


def _save_pretrained(t: _Taken, *args, **kwargs):
    """Write the weights as they were before accelerate: the original tensors where the dtype changed
    (kept), contiguous copies where only the memory format did (safetensors takes contiguous tensors)."""
    m = t.module
    swapped = []
    try:
        held = {(id(sub), kind, name): x for sub, kind, name, x in (t.originals or [])}
        for sub in m.modules():
            for kind in ("_parameters", "_buffers"):
                for name, x in getattr(sub, kind).items():
                    if x is None:
                        continue
                    orig = held.get((id(sub), kind, name))
                    if orig is None and x.is_contiguous():
                        continue
                    swapped.append((x, x.data))
                    x.data = orig if orig is not None else x.data.contiguous()
        return type(m).save_pretrained(m, *args, **kwargs)
    finally:
        for x, data in swapped:
            x.data = data
