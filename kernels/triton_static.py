"""Compile the Triton attention kernel for NVIDIA GPUs without one, and check what each config uses.

    python -m fastsd.kernels.triton_static [--arch 80 86 90] [--head-dim 40 64 80 160] [--dtype fp16 bf16 fp32]

For every config `triton_attention_configs.usable_configs` keeps for an architecture's shared-memory
limit, at each head dim and dtype, this compiles the kernel for that architecture (Triton's compiler and
the ptxas in its wheel; no GPU, no CUDA driver), reads the shared memory from the compiled kernel's
metadata and the per-thread stack (spilled registers) from `cuobjdump --dump-resource-usage`, and fails
when a kept config needs more shared memory than its architecture allows or than the table says, or
spills. Compiles take 3-30 s each on one CPU core; Triton caches them (TRITON_CACHE_DIR, else
~/.triton/cache), so reruns are fast.

Called from a process whose Triton runs in interpreter mode (TRITON_INTERPRET=1, as the tests set it),
`check` compiles in a child process without it: the interpreter patches `triton.language` process-wide,
and a GPU compile inside that patching fails on a cold cache (a warm cache used to hide it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from .triton_attention_configs import ARCH_SMEM_LIMIT, CONFIGS, operand_kind, padded_head_dim, usable_configs

HEAD_DIMS = (40, 64, 80, 160)  # SD 1.x: 40, 80, 160 (8 heads); SD 2.x: 64
DTYPES = ("fp16", "bf16", "fp32")
ARCHS = (80, 86, 90)


@dataclass
class Compiled:
    arch: int
    dtype: str
    block_d: int
    config: tuple
    precision: str
    shared: int
    listed_shared: int
    limit: int
    registers: int
    spill_bytes: int
    seconds: float
    problem: str


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes per thread) of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[:300]}")
    return int(m[1]), int(m[2])


def compile_attention(arch: int, dtype: str, block_d: int, config: tuple, precision: str):
    """Compile the kernel as a launch on SD tensors would: 16-byte aligned pointers, unit head-dim strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_attention_kernel as kernel  # here, not at the top: importing it imports triton
    fn = kernel._attn_fwd
    if kernel.INTERPRETED:
        raise RuntimeError("compile_attention needs Triton's compiler, not its interpreter: run it in a process "
                           "without TRITON_INTERPRET=1 (check() does that itself)")
    bm, bn, warps, stages = config
    ptr = "*" + dtype
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "DOT_FP32": dtype == "fp32",
              "INPUT_PRECISION": precision,
              "stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1}
    types = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "qk_scale": "fp32"}
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("Q", "K", "V", "O")}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _interpreting() -> bool:
    from . import triton_attention_kernel as kernel  # here, not at the top: importing it imports triton
    return kernel.INTERPRETED


def _check_in_child(archs, head_dims, dtypes, echo) -> list[Compiled]:
    """Run `main --json` in a fresh interpreter with TRITON_INTERPRET unset; rows stream back as JSON lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastsd.kernels.triton_static", "--json",
           "--arch", *map(str, archs), "--head-dim", *map(str, head_dims), "--dtype", *dtypes]
    rows = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("{"):
                d = json.loads(line)
                row = Compiled(**{**d, "config": tuple(d["config"])})
                rows.append(row)
                if echo:
                    echo(row)
        err = proc.stderr.read()
    if proc.returncode not in (0, 1):  # 1: configs compiled, some failed (their rows say why)
        raise RuntimeError(f"triton_static child process failed (exit {proc.returncode}): {err[-2000:]}")
    return rows


def check(archs=ARCHS, head_dims=HEAD_DIMS, dtypes=DTYPES, echo=None) -> list[Compiled]:
    if _interpreting():
        return _check_in_child(archs, head_dims, dtypes, echo)
    rows = []
    for arch in archs:
        limit = ARCH_SMEM_LIMIT[arch]
        for dtype in dtypes:
            dot_fp32 = dtype == "fp32"
            # fp32 tiles take "ieee" unless torch allows TF32 ("tf32"): both are compiled
            precisions = ("ieee", "tf32") if dot_fp32 else ("tf32",)
            for block_d in sorted({padded_head_dim(d) for d in head_dims}):
                listed = dict(CONFIGS.get((operand_kind(dot_fp32), block_d), []))
                for config in usable_configs(block_d, dot_fp32, limit):
                    for precision in precisions:
                        t = time.time()
                        k = compile_attention(arch, dtype, block_d, config, precision)
                        regs, stack = resource_usage(k.asm["cubin"])
                        shared = int(k.metadata.shared)
                        problem = []
                        if shared > limit:
                            problem.append(f"needs {shared} B shared memory, sm{arch} allows {limit}")
                        if shared > listed[config]:
                            problem.append(f"needs {shared} B shared memory, the table lists {listed[config]}")
                        if stack:
                            problem.append(f"spills ({stack} B stack per thread)")
                        row = Compiled(arch, dtype, block_d, config, precision, shared, listed[config], limit,
                                       regs, stack, round(time.time() - t, 1), "; ".join(problem))
                        rows.append(row)
                        if echo:
                            echo(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.kernels.triton_static", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(ARCH_SMEM_LIMIT))
    p.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--json", action="store_true", help="one JSON object per compiled config")
    args = p.parse_args(argv)

    def echo(r: Compiled):
        if args.json:
            print(json.dumps(asdict(r)), flush=True)
        else:
            print(f"sm{r.arch} {r.dtype:4} BLOCK_D={r.block_d:3} {r.config} {r.precision:4}: {r.shared:6} B shared "
                  f"(listed {r.listed_shared}, limit {r.limit}), {r.registers} regs, {r.spill_bytes} B spilled, "
                  f"{r.seconds}s {'FAIL: ' + r.problem if r.problem else 'ok'}", flush=True)

    rows = check(args.arch, args.head_dim, args.dtype, echo)
    bad = [r for r in rows if r.problem]
    print(f"{len(rows)} configs compiled, {len(bad)} failed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
