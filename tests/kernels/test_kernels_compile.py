"""Compile the Triton kernels for NVIDIA targets without a GPU (ptxas ships in the triton wheel).

The interpreter tests check the math; this checks that the compiled path (GPU codegen: tl.dot shapes,
dtypes, input_precision, padded head dims) builds for sm80 and sm90. It runs in a subprocess because
the kernels must be imported WITHOUT TRITON_INTERPRET. Slow (tens of seconds to minutes).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import HAVE_TRITON

SCRIPT = textwrap.dedent('''
    import sys, triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from fastsd.kernels import triton_attention_kernel as A, triton_norm as N, triton_geglu as G
    assert not A.INTERPRETED

    def build(fn, types, consts, arch, **opts):
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)

    for arch in (80, 90):
        for dt, bd, bm in (("fp16", 64, 128), ("fp16", 256, 64), ("bf16", 128, 128), ("fp32", 64, 64)):
            types = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "O": "*" + dt, "qk_scale": "fp32"}
            consts = {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_D": bd, "DOT_FP32": dt == "fp32",
                      "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32"}
            build(A._attn_fwd, types, consts, arch, num_warps=4, num_stages=3)
        build(N._groupnorm_silu_fwd, {"X": "*fp16", "Y": "*fp16", "W": "*fp16", "B": "*fp16", "eps": "fp32"},
              {"APPLY_SILU": True, "HAS_AFFINE": True, "ROWS": 1, "BLOCK": 2048}, arch, num_warps=8)
        build(G._geglu_fwd, {"X": "*fp16", "Y": "*fp16"}, {"BLOCK_R": 4, "BLOCK_F": 1024}, arch, num_warps=4)
    print("compiled")
''')


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_kernels_compile_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
