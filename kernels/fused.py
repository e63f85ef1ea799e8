"""Fused ops for the SD UNet and VAE, each a Triton kernel with a torch fallback and an `available` check.

- groupnorm_silu: silu(group_norm(x)) in one pass (ResNet blocks' norm1/norm2 + SiLU, and the
  conv_norm_out + conv_act pairs of the UNet and the VAE encoder/decoder).
- geglu: a * gelu(gate) over the two halves of the feed-forward projection (diffusers' GEGLU).
- fuse_qkv: one Q|K|V GEMM for self-attention and one K|V GEMM for cross-attention, done by diffusers'
  own `fuse_qkv_projections()` / `Attention.fuse_projections` (FastSDAttnProcessor reads the fused
  weights).

The torch fallbacks compute exactly what diffusers computes (same ops, same order) but reuse one
buffer (in-place SiLU after group_norm, in-place multiply after gelu), so they save one
activation-sized allocation per call and are bit-identical to diffusers' output.

Modules are patched by switching their class to a subclass with a fused forward, so parameters,
state_dict keys and isinstance checks stay as they were; `remove_fused_ops` switches them back.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device_guard import as_device
from .probe_cache import ProbeCache
from .processor import FastSDAttnProcessor
from .triton_availability import triton_status
from .triton_launch import FailedLaunches, launch_failure

logger = logging.getLogger("fastsd.kernels")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- availability -------------------------------------------------------------------------------
def fused_op_available(op: str, device, dtype) -> tuple[bool, str]:
    """Whether the TRITON kernel of `op` ("groupnorm_silu" or "geglu") can run on device/dtype, decided
    (like the attention backends) by a tiny probe call checked against torch and cached: Triton builds
    its launcher with a C compiler and the Python headers on first use, which a slim image may lack.
    (The torch fallback always can run.)"""
    if op not in ("groupnorm_silu", "geglu"):
        raise ValueError(f"unknown fused op {op!r}; known: groupnorm_silu, geglu")
    device = as_device(device)
    ok, reason = triton_status(device)
    if not ok:
        return False, reason
    if dtype not in _TRITON_DTYPES:
        return False, f"the triton {op} kernel takes fp16, bf16 or fp32, not {dtype}"
    return _probe_cache.get((op, device.type, device.index, dtype), lambda: _probe(op, device, dtype, reason))


_probe_cache = ProbeCache()


def clear_probe_cache() -> None:
    _probe_cache.clear()
    _failed.clear()


# (op, device, dtype) whose kernel failed to compile or launch at a real shape (the probe's tiny one worked):
# those calls take the torch path from then on, logged once
_failed = FailedLaunches("fused op", "the torch implementation")


def _kernel_or_torch(op: str, x: torch.Tensor, kernel, fallback):
    key = (op, str(x.device), x.dtype)
    if _failed.get(key) is None:
        try:
            return kernel()
        except Exception as exc:
            why = launch_failure(exc)
            if why is None:
                raise
            _failed.add(key, why)
    return fallback()


def _probe(op: str, device: torch.device, dtype: torch.dtype, reason: str) -> tuple[bool, str]:
    try:
        module = _kernel(op)
    except Exception as exc:  # e.g. a Triton release whose API the kernel module does not match
        return False, f"the triton {op} kernel module failed to import: {type(exc).__name__}: {_first_line(exc)}"
    if device.type == "cpu" and not module.INTERPRETED:
        return False, "TRITON_INTERPRET=1 was not set before the triton kernel module was imported"
    if device.type == "cuda" and module.INTERPRETED:
        return False, "the triton kernels were imported in interpreter mode (TRITON_INTERPRET=1)"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        if op == "groupnorm_silu":
            x = torch.randn(1, 4, 3, 3, generator=g).to(device=device, dtype=dtype)
            w = torch.randn(4, generator=g).to(device=device, dtype=dtype)
            b = torch.randn(4, generator=g).to(device=device, dtype=dtype)
            got = module.groupnorm_silu(x, 2, w, b, 1e-5)
            want = groupnorm_silu_torch(x.float(), 2, w.float(), b.float(), 1e-5)
        else:
            x = torch.randn(3, 8, generator=g).to(device=device, dtype=dtype)
            got = module.geglu(x)
            want = geglu_torch(x.float())
        err = (got.float() - want).abs().max().item()
    except Exception as exc:  # no C compiler, no Python headers, no driver, a PTX error: torch it is
        return False, f"triton {op} probe call failed: {type(exc).__name__}: {_first_line(exc)}"
    if not err < 5e-2:
        return False, f"triton {op} probe call gave wrong results (max error {err:.3g})"
    return True, reason


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _kernel(op: str):
    # The Triton kernel modules are imported here, on first use, and in the functions below for the same
    # reason: importing them imports triton, which `import fastsd` must not.
    if op == "groupnorm_silu":
        from . import triton_norm  # lazy: imports triton

        return triton_norm
    from . import triton_geglu  # lazy: imports triton

    return triton_geglu


def _resolve_impl(op: str, impl: str, device, dtype) -> str:
    """'auto' -> 'triton' on CUDA when the kernel is available, else 'torch'. The interpreter is never
    chosen automatically (tests ask for impl='triton' explicitly)."""
    if impl == "torch":
        return "torch"
    device = as_device(device)
    ok, reason = fused_op_available(op, device, dtype)
    if impl == "triton":
        if not ok:
            raise ValueError(f"triton {op} kernel unavailable on {device} with {dtype}: {reason}")
        return "triton"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', not {impl!r}")
    return "triton" if ok and device.type == "cuda" else "torch"


# -- functional ops -----------------------------------------------------------------------------
def groupnorm_silu_torch(x, num_groups, weight, bias, eps=1e-5):
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps), inplace=True)


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                   *, impl: str = "auto") -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)). impl: 'auto' | 'triton' | 'torch'.
    The triton kernel reads NCHW-contiguous and channels_last tensors as they are (other layouts are made
    contiguous) and returns x's layout."""
    impl = _resolve_impl("groupnorm_silu", impl, x.device, x.dtype)
    if impl == "triton":
        from .triton_norm import groupnorm_silu as kernel  # lazy: imports triton

        return kernel(x, num_groups, weight, bias, eps)
    return groupnorm_silu_torch(x, num_groups, weight, bias, eps)


def geglu_torch(x):
    hidden, gate = x.chunk(2, dim=-1)
    return F.gelu(gate).mul_(hidden)


def geglu(x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """x[..., :F] * gelu(x[..., F:]) (exact gelu). impl: 'auto' | 'triton' | 'torch'."""
    impl = _resolve_impl("geglu", impl, x.device, x.dtype)
    if impl == "triton":
        from .triton_geglu import geglu as kernel  # lazy: imports triton

        return kernel(x)
    return geglu_torch(x)


# -- module patches -----------------------------------------------------------------------------
def _gn_silu(norm: nn.GroupNorm, x: torch.Tensor, impl: str) -> torch.Tensor:
    def torch_path():
        return groupnorm_silu_torch(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    if impl == "triton":  # NCHW or channels_last (the channels_last UNet keeps the kernel)
        from .triton_norm import groupnorm_silu as kernel  # lazy: imports triton

        return _kernel_or_torch("groupnorm_silu", x, lambda: kernel(x, norm.num_groups, norm.weight, norm.bias,
                                                                    norm.eps), torch_path)
    return torch_path()


class FusedGroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm whose forward also applies SiLU (used for conv_norm_out; conv_act becomes Identity)."""

    _fastsd_impl = "torch"

    def forward(self, x):
        return _gn_silu(self, x, self._fastsd_impl)


def _resnet_classes():
    from diffusers.models.resnet import ResnetBlock2D

    class FusedResnetBlock2D(ResnetBlock2D):
        """diffusers ResnetBlock2D with norm+SiLU pairs fused. Same parameters, same math."""

        _fastsd_impl = "torch"

        def forward(self, input_tensor, temb, *args, **kwargs):
            impl = self._fastsd_impl
            h = _gn_silu(self.norm1, input_tensor, impl)
            if self.upsample is not None:
                if h.shape[0] >= 64:  # as diffusers: nearest upsampling of huge NHWC batches fails
                    input_tensor, h = input_tensor.contiguous(), h.contiguous()
                input_tensor, h = self.upsample(input_tensor), self.upsample(h)
            elif self.downsample is not None:
                input_tensor, h = self.downsample(input_tensor), self.downsample(h)
            h = self.conv1(h)
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if self.time_embedding_norm == "default":
                if temb is not None:
                    h = h + temb
                h = _gn_silu(self.norm2, h, impl)
            elif self.time_embedding_norm == "scale_shift":  # modulation between norm and activation
                if temb is None:
                    raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
                scale, shift = torch.chunk(temb, 2, dim=1)
                h = self.nonlinearity(self.norm2(h) * (1 + scale) + shift)
            else:  # e.g. "group" in the VAE mid block: no time embedding is added
                h = _gn_silu(self.norm2, h, impl)
            h = self.dropout(h)
            h = self.conv2(h)
            if self.conv_shortcut is not None:
                input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
            return (input_tensor + h) / self.output_scale_factor

    _make_importable(FusedResnetBlock2D)
    return ResnetBlock2D, FusedResnetBlock2D


def _make_importable(cls):
    # built lazily (diffusers is imported on first use), but picklable as fastsd.kernels.fused.<name>
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls


def __getattr__(name):
    if name == "FusedResnetBlock2D":
        return _resnet_pair()[1]
    if name == "FusedGEGLU":
        return _geglu_pair()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_RESNET = None


def _resnet_pair():
    global _RESNET
    if _RESNET is None:
        _RESNET = _resnet_classes()
    return _RESNET


def _geglu_classes():
    from diffusers.models.activations import GEGLU

    class FusedGEGLU(GEGLU):
        """diffusers GEGLU with gelu and the gating multiply fused."""

        _fastsd_impl = "torch"

        def forward(self, hidden_states, *args, **kwargs):
            h = self.proj(hidden_states)
            if self._fastsd_impl == "triton":
                from .triton_geglu import geglu as kernel  # lazy: imports triton

                return _kernel_or_torch("geglu", h, lambda: kernel(h), lambda: geglu_torch(h))
            return geglu_torch(h)

    _make_importable(FusedGEGLU)
    return GEGLU, FusedGEGLU


_GEGLU = None


def _geglu_pair():
    global _GEGLU
    if _GEGLU is None:
        _GEGLU = _geglu_classes()
    return _GEGLU


def _patch_groupnorm_silu(root: nn.Module, impl: str) -> int:
    ResnetBlock2D, FusedResnetBlock2D = _resnet_pair()
    n = 0
    for m in root.modules():
        if (type(m) is ResnetBlock2D and isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)
                and type(m.nonlinearity) is nn.SiLU):
            m.__class__ = FusedResnetBlock2D
            m._fastsd_impl = impl
            n += 1
        elif type(m) is FusedResnetBlock2D:
            m._fastsd_impl = impl
    # conv_norm_out followed by conv_act = SiLU: UNet2DConditionModel, VAE Encoder and Decoder
    for m in root.modules():
        norm, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
        if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
            norm.__class__ = FusedGroupNormSiLU
            norm._fastsd_impl = impl
            m.conv_act = nn.Identity()
            m._fastsd_removed_conv_act = True
            n += 1
    return n


def _patch_geglu(root: nn.Module, impl: str) -> int:
    GEGLU, FusedGEGLU = _geglu_pair()
    n = 0
    for m in root.modules():
        if type(m) is GEGLU:
            m.__class__ = FusedGEGLU
            m._fastsd_impl = impl
            n += 1
        elif type(m) is FusedGEGLU:
            m._fastsd_impl = impl
    return n


def fuse_projections(root: nn.Module) -> tuple[bool, str]:
    """Fuse Q|K|V (self-attention) and K|V (cross-attention) projections of every diffusers Attention in
    `root` with diffusers' own `fuse_qkv_projections()` (or `Attention.fuse_projections`), keeping a
    FastSDAttnProcessor where one is installed (it reads the fused weights). Skipped, with the reason,
    when other custom processors are installed. diffusers keeps the unfused weights too (so that
    `unfuse_qkv_projections` works): +56.3M parameters for SD 1.5's UNet (215 MiB in fp32).
    Returns (fused, reason)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    attns = [m for m in root.modules() if isinstance(m, Attention)]
    if not attns:
        return False, "no attention modules"
    if all(getattr(m, "fused_projections", False) for m in attns):
        return True, "already fused"
    procs = [m.processor for m in attns]
    foreign = sorted({type(p).__name__ for p in procs
                      if not isinstance(p, (FastSDAttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0))})
    if foreign:
        return False, (f"attention processors {', '.join(foreign)} are installed and would ignore fused "
                       f"weights (diffusers' fuse_qkv_projections would replace them)")
    if hasattr(root, "fuse_qkv_projections"):
        root.fuse_qkv_projections()  # fuses every Attention and installs FusedAttnProcessor2_0
    else:
        with torch.no_grad():
            for m in attns:
                m.fuse_projections(fuse=True)
        for m in attns:
            m.set_processor(FusedAttnProcessor2_0())
    for m, p in zip(attns, procs):  # ours reads to_qkv / to_kv itself: put it back
        if isinstance(p, FastSDAttnProcessor):
            m.set_processor(p)
    return True, "fused"


@torch.no_grad()
def refresh_fused_projections(root: nn.Module) -> int:
    """Copy to_q/to_k/to_v (weights and biases) into the fused to_qkv / to_kv of every fused diffusers
    Attention in `root` (root may be one Attention), in place: the same storage, so a CUDA graph or a compiled
    graph that reads the fused weight sees the new values. Needed whenever the unfused weights change after
    fusing (a LoRA set written into to_q/to_k/to_v): the processor reads only the fused copy, so without
    this the adapters' attention deltas changed nothing. Returns the number of fused projections refreshed."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for m in root.modules():
        if not isinstance(m, Attention) or not getattr(m, "fused_projections", False):
            continue
        for fused_name, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            fused = getattr(m, fused_name, None)
            if fused is None:
                continue
            linears = [getattr(m, p) for p in parts]
            fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
            n += 1
    return n


def apply_fused_ops(unet, vae, device, dtype, groupnorm_silu: bool = True, geglu: bool = True,
                    fuse_qkv: bool = True) -> list[str]:
    """Install the fused ops that help on `device` into `unet` and `vae` (either may be None).
    Returns the names applied, a subset of ["groupnorm_silu", "geglu", "fuse_qkv"].

    CUDA: the Triton kernels when triton works (torch fallbacks otherwise) and fused QKV/KV GEMMs.
    CPU: the torch fallbacks of groupnorm_silu and geglu (identical math, one allocation fewer per call,
    measured equal or faster); fuse_qkv is skipped (time-neutral, costs memory). See kernels/README.md.
    """
    device = as_device(device)
    roots = [m for m in (unet, vae) if m is not None]
    applied: list[str] = []
    details: list[str] = []
    for name, wanted, patch in (("groupnorm_silu", groupnorm_silu, _patch_groupnorm_silu),
                                ("geglu", geglu, _patch_geglu)):
        if wanted:
            impl = _resolve_impl(name, "auto", device, dtype)
            n = sum(patch(r, impl) for r in roots)
            if n:
                applied.append(name)
                details.append(f"{name}[{impl}] x{n}")
    if fuse_qkv:
        if device.type == "cuda":
            results = [(r, *fuse_projections(r)) for r in roots]
        else:
            why = ("not applied on CPU: measured time-neutral (SD 1.5 QKV GEMMs 51.2->48.9, 49.1->48.1, "
                   "73.9->74.3 ms; KV equal) while diffusers keeps the unfused weights (+215 MiB fp32 for "
                   "SD 1.5); call fuse_projections() to force it")
            results = [(r, False, why) for r in roots]
        if any(ok for _, ok, _ in results):
            applied.append("fuse_qkv")
        for r, ok, why in results:
            details.append(f"fuse_qkv {type(r).__name__}: {why}")
            if not ok:
                logger.info("fuse_qkv skipped for %s: %s", type(r).__name__, why)
    logger.info("fused ops on %s/%s: %s", device, str(dtype).replace("torch.", ""), "; ".join(details) or "none")
    return applied


def remove_fused_ops(*modules: nn.Module) -> None:
    """Undo the groupnorm_silu and geglu patches (fused QKV: use diffusers' unfuse_qkv_projections)."""
    ResnetBlock2D, FusedResnetBlock2D = _resnet_pair()
    GEGLU, FusedGEGLU = _geglu_pair()
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if type(m) is FusedResnetBlock2D:
                m.__class__ = ResnetBlock2D
            elif type(m) is FusedGEGLU:
                m.__class__ = GEGLU
            if getattr(m, "_fastsd_removed_conv_act", False):
                m.conv_norm_out.__class__ = nn.GroupNorm
                m.conv_act = nn.SiLU()
                m._fastsd_removed_conv_act = False


def use_channels_last(module: nn.Module, device) -> bool:
    """Convert `module` to channels_last where that is expected to help: CUDA only.
    On CPU (eager) channels_last was measured by the project not to help, so this returns False and
    leaves the module alone. The triton groupnorm_silu kernel reads channels_last tensors as they are."""
    device = as_device(device)
    if device.type != "cuda":
        return False
    module.to(memory_format=torch.channels_last)
    return True
