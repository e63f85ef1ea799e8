"""The diffusers attention processor that routes attention through a fastsd.kernels backend.

`FastSDAttnProcessor` follows diffusers' processor call protocol
`__call__(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, ...)`
and does what diffusers' AttnProcessor2_0 does around the attention itself: spatial_norm, 4D input
(the VAE mid-block attention), attention_mask preparation, group_norm, norm_cross, norm_q/norm_k,
output projection and dropout, residual_connection and rescale_output_factor. It also understands
fused projections (`attn.to_qkv` / `attn.to_kv` made by diffusers' `fuse_projections`), so one
processor serves fused and unfused modules alike.

Slicing: with `slice_size` set, attention runs over at most `slice_size` (batch * head) rows at a time,
the same unit as diffusers' `set_attention_slice`. diffusers' slicing works by REPLACING processors with
its SlicedAttnProcessor, which would drop this processor; fastsd.kernels.memory.apply_memory_plan
therefore sets `slice_size` on this processor instead when it is installed, and `install_attention`
carries a slice size over from a SlicedAttnProcessor it replaces.
"""

from __future__ import annotations

import logging

import torch

from .registry import choose_attention, get_backend

logger = logging.getLogger("fastsd.kernels")

_FALLBACK = "sdpa"


class FastSDAttnProcessor:
    """Attention processor for diffusers' `Attention` modules backed by a fastsd.kernels backend.

    backend: a registered backend name (already resolved; see `install_attention`).
    upcast: compute scores and softmax in fp32 for fp16 inputs (SD 2.x overflows in fp16 otherwise).
    slice_size: None, or the number of (batch * head) rows per attention call.
    """

    def __init__(self, backend: str = "sdpa", *, upcast: bool = False, slice_size: int | None = None):
        self.backend = backend
        self._fn = get_backend(backend).fn
        self._supports = get_backend(backend).supports
        self._fallback_fn = get_backend(_FALLBACK).fn
        self.upcast = bool(upcast)
        self.slice_size = None
        self.set_slice_size(slice_size)
        self._fallback_logged: set[str] = set()

    def __repr__(self) -> str:
        return (f"FastSDAttnProcessor(backend={self.backend!r}, upcast={self.upcast}, "
                f"slice_size={self.slice_size})")

    def set_slice_size(self, slice_size: int | None) -> None:
        if slice_size is not None:
            slice_size = int(slice_size)
            if slice_size < 1:
                raise ValueError(f"slice_size must be >= 1 or None, got {slice_size}")
        self.slice_size = slice_size

    # -- attention core ------------------------------------------------------------------------
    def _attend(self, q, k, v, scale, mask):
        fn = self._fn
        ok, why = self._supports(q, k, v, mask)
        if not ok:
            if why not in self._fallback_logged:
                self._fallback_logged.add(why)
                logger.info("attention backend %r cannot take this call (%s); using %r for it",
                            self.backend, why, _FALLBACK)
            fn = self._fallback_fn
        return fn(q, k, v, scale=scale, attn_mask=mask, upcast=self.upcast)

    def attention(self, q, k, v, scale, mask=None):
        """q: (B, H, M, D), k/v: (B, H, N, D), mask broadcastable to (B, H, M, N) -> (B, H, M, D)."""
        B, H, M, D = q.shape
        s = self.slice_size
        if s is None or s >= B * H:
            return self._attend(q, k, v, scale, mask)
        out = torch.empty((B, M, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
        if mask is not None:
            mask = mask.expand(B, H, mask.shape[-2], mask.shape[-1])
        if s >= H:  # whole heads, several batch entries per slice
            step = s // H
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                m = mask[b0:b1] if mask is not None else None
                out[b0:b1] = self._attend(q[b0:b1], k[b0:b1], v[b0:b1], scale, m)
        else:  # part of the heads of one batch entry per slice
            for b in range(B):
                for h0 in range(0, H, s):
                    h1 = min(H, h0 + s)
                    sl = (slice(b, b + 1), slice(h0, h1))
                    m = mask[sl] if mask is not None else None
                    out[sl] = self._attend(q[sl], k[sl], v[sl], scale, m)
        return out

    # -- diffusers processor protocol ----------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        batch = hidden_states.shape[0]
        kv_len = hidden_states.shape[1] if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        fused = getattr(attn, "fused_projections", False)
        if encoder_hidden_states is None and fused and getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if fused and getattr(attn, "to_kv", None) is not None:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = attn.scale if getattr(attn, "scale_qk", True) else 1.0
        hidden_states = self.attention(query, key, value, scale, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def _iter_modules(module):
    """nn.Modules in `module`: an nn.Module, a list/tuple of them, or an object with .unet/.vae."""
    if module is None:
        return
    if isinstance(module, torch.nn.Module):
        yield module
        return
    if isinstance(module, (list, tuple, set)):
        for m in module:
            yield from _iter_modules(m)
        return
    found = False
    for attr in ("unet", "vae", "transformer"):
        sub = getattr(module, attr, None)
        if isinstance(sub, torch.nn.Module):
            found = True
            yield sub
    if not found:
        raise TypeError(f"expected an nn.Module, a list of them, or an object with .unet/.vae; got {type(module)}")


def attention_modules(module) -> list:
    Attention = _attention_class()
    out = []
    for root in _iter_modules(module):
        out.extend(m for m in root.modules() if isinstance(m, Attention))
    return out


def _infer_device_dtype(module, device, dtype):
    if device is not None and dtype is not None:
        return device, dtype
    for root in _iter_modules(module):
        for p in root.parameters():
            return (device if device is not None else p.device), (dtype if dtype is not None else p.dtype)
    return (device if device is not None else torch.device("cpu")), (dtype if dtype is not None else torch.float32)


def install_attention(module, name: str = "auto", *, device=None, dtype=None, upcast: bool | None = None,
                      slice_size: int | None = None) -> str:
    """Put one FastSDAttnProcessor into every diffusers `Attention` of `module` (the UNet, the VAE,
    a list of both, or a pipeline-like object with .unet/.vae). Returns the backend name used.

    name: "auto" or a backend name (an unavailable name raises BackendUnavailable).
    device, dtype: default to those of the module's first parameter.
    upcast: fp32 scores/softmax; None means "on for fp16" (SD 2.x overflows in fp16).
    slice_size: (batch * head) rows per attention call; None keeps a slice size from diffusers'
        SlicedAttnProcessor or a previous FastSDAttnProcessor, if there was one.
    """
    device, dtype = _infer_device_dtype(module, device, dtype)
    chosen = choose_attention(name, device, dtype)
    if upcast is None:
        upcast = dtype == torch.float16
    total = 0
    for root in _iter_modules(module):  # one processor per model, so slicing the UNet leaves the VAE alone
        modules = attention_modules(root)
        if not modules:
            continue
        root_slice = slice_size
        if root_slice is None:
            prev = [getattr(getattr(m, "processor", None), "slice_size", None) for m in modules]
            prev = [p for p in prev if isinstance(p, int)]
            root_slice = min(prev) if prev else None
        processor = FastSDAttnProcessor(chosen, upcast=upcast, slice_size=root_slice)
        for m in modules:
            m.set_processor(processor)
        total += len(modules)
        logger.debug("installed %r into %d attention modules of %s", processor, len(modules), type(root).__name__)
    return chosen


def installed_processors(module) -> list:
    """The FastSDAttnProcessor instances installed in `module` (deduplicated)."""
    seen, out = set(), []
    for m in attention_modules(module):
        p = getattr(m, "processor", None)
        if isinstance(p, FastSDAttnProcessor) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
