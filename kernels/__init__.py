"""fastsd.kernels: attention backends, fused ops, CUDA graphs and memory planning.

Engine-facing API:

    choose_attention(name, device, dtype) -> str
    install_attention(module, name="auto", *, device=None, dtype=None, upcast=None, slice_size=None) -> str
    apply_fused_ops(unet, vae, device, dtype, groupnorm_silu=True, geglu=True, fuse_qkv=True) -> list[str]
    refresh_fused_projections(module) -> int   (after to_q/to_k/to_v change under fused QKV)
    plan_memory(unet_config, vae_config, batch, height, width, dtype, device, budget_bytes=None) -> MemoryPlan
    apply_memory_plan(unet, vae, plan) -> list[str]
    CUDAGraphRunner(unet_fn, *, max_graphs=4)
    check_finite(tensor, what) -> tensor   (raises NonFiniteError)

This package does not itself import triton, xformers or diffusers at import time; they load on first
use (fastsd's own __init__ may import diffusers anyway).
"""

from .attention_backend import AttentionBackend
from .cuda_graphs import CUDAGraphRunner
from .cuda_graphs import available as cuda_graphs_available
from .errors import BackendUnavailable, NonFiniteError
from .fused import (
    apply_fused_ops,
    fuse_projections,
    fused_op_available,
    geglu,
    groupnorm_silu,
    refresh_fused_projections,
    remove_fused_ops,
    use_channels_last,
)
from .memory import MemoryPlan, apply_memory_plan, available_memory_bytes, plan_memory
from .processor import FastSDAttnProcessor, install_attention, installed_processors
from .registry import (
    AUTO_PREFERENCE,
    attention,
    available_backends,
    backend_status,
    choose_attention,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
)
from .nan_check import check_finite

__all__ = [
    "AUTO_PREFERENCE", "AttentionBackend", "BackendUnavailable", "CUDAGraphRunner", "FastSDAttnProcessor",
    "MemoryPlan", "NonFiniteError", "apply_fused_ops", "apply_memory_plan", "attention", "available_backends",
    "available_memory_bytes", "backend_status", "check_finite", "choose_attention", "cuda_graphs_available",
    "fuse_projections", "fused_op_available", "geglu", "get_backend", "groupnorm_silu", "install_attention", "installed_processors",
    "list_backends", "plan_memory", "refresh_fused_projections", "register_backend", "remove_fused_ops", "unregister_backend",
    "use_channels_last",
]
