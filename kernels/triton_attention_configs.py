"""Which launch configs of the Triton attention kernel may run on a GPU (pure Python: no triton import).

The autotuner times every config it is given and keeps the fastest. A config that needs more shared
memory than the GPU allows fails with OutOfResources, and when *every* config fails the autotuner still
picks one and the launch raises (fp32 at head dim 160 on an A100 did). A config that spills registers
runs, slowly. Neither shows on a CPU, and the availability probe (head dim 8) never meets them, so the
configs are chosen here, per padded head dim and operand type, from what the compiled kernels use:
`CONFIGS` lists only configs that compiled for sm80, sm86 and sm90 (Triton 3.9, ptxas from its wheel)
without spilling, with the most shared memory each needed. At run time those needing more than the GPU allows are dropped; when
none is left the call goes to another backend (`unusable_reason` in triton_attention_kernel.py).

`tests/kernels/test_kernels_static.py` (`python -m fastsd.kernels.triton_static`) compiles every config
listed here for sm80, sm86 and sm90 at each SD head dim and dtype, and fails when one spills, needs more
shared memory than listed, or more than its architecture allows while the rule below would keep it.
Configs measured and left out (sm80): fp16 128-wide key tiles (spill at head dim 64), (128, 64, 4, 3)
and (64, 64, 4, 3) from head dim 128 up (spill), (64, 32, 4, 4) at 128, (64, 64, 8, 2) and (32, 32, 4, 2)
at 256 (spill); fp32 tiles in "ieee" precision at head dim 64 with 4 warps or 64-wide key tiles (5-6 KB
of spills per thread); fp32 at head dim 256: 213-344 KB of shared memory, more than any GPU has.
"""
from __future__ import annotations

Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# {(operand kind, padded head dim): [(config, shared memory bytes), ...]}: the most that config needed at
# sm80, sm86 or sm90 (fp32 tiles: in "ieee" or "tf32" precision; tf32 at sm90 needed the most). "half" is
# fp16 and bf16 tiles; "fp32" is fp32 tiles (DOT_FP32).
CONFIGS: dict[tuple[str, int], list[tuple[Config, int]]] = {
    ("half", 64): [((128, 64, 8, 3), 24576), ((128, 32, 4, 4), 20480), ((64, 64, 4, 3), 16384),
                   ((64, 32, 4, 4), 12288), ((64, 64, 8, 2), 16384)],
    ("half", 128): [((64, 64, 8, 2), 40960), ((64, 32, 8, 2), 28672)],
    ("half", 256): [((64, 32, 8, 2), 53248), ((64, 16, 8, 2), 43008)],
    ("fp32", 64): [((64, 32, 8, 2), 49152)],
    ("fp32", 128): [((64, 32, 8, 2), 98304)],
    ("fp32", 256): [],
}

# Shared memory one block may opt in to, per compute capability (CUDA C Programming Guide, "Features and
# Technical Specifications"): what the offline checks compile against. On a GPU the device is asked
# (`torch.cuda.get_device_properties(i).shared_memory_per_block_optin`).
ARCH_SMEM_LIMIT: dict[int, int] = {
    75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
}


def padded_head_dim(d: int) -> int:
    """tl.arange needs a power of two: 40 -> 64, 80 -> 128, 160 -> 256 (at least 64: the smallest listed)."""
    p = 64
    while p < d:
        p *= 2
    return p


def operand_kind(dot_fp32: bool) -> str:
    return "fp32" if dot_fp32 else "half"


def usable_configs(block_d: int, dot_fp32: bool, smem_limit: int, n_keys: int | None = None) -> list[Config]:
    """The listed configs for this padded head dim and operand kind that fit `smem_limit` bytes of shared
    memory, without key tiles wider than the keys (77 text tokens: no 128-wide tiles)."""
    kept = []
    for cfg, smem in CONFIGS.get((operand_kind(dot_fp32), block_d), []):
        if smem > smem_limit:
            continue
        if n_keys is not None and cfg[1] > max(32, _next_pow2(n_keys)):
            continue
        kept.append(cfg)
    return kept


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
