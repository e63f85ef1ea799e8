"""Every Triton attention config the autotuner can be given, compiled offline for sm80, sm86 and sm90
(Triton's compiler and the ptxas in its wheel; no GPU), at each SD head dim and dtype: none may need more
shared memory than its architecture allows (or than the config table lists), none may spill registers.
Runs in a subprocess: the kernels must be built for a GPU, not for the interpreter (TRITON_INTERPRET)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HAVE_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed (pip install 'fastsd[triton]')")


def _compile(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fastsd.kernels.triton_static", "--json", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


def _expected(archs, head_dims, dtypes):
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT, padded_head_dim, usable_configs
    n = 0
    for arch in archs:
        for dtype in dtypes:
            for block_d in {padded_head_dim(d) for d in head_dims}:
                n += len(usable_configs(block_d, dtype == "fp32", ARCH_SMEM_LIMIT[arch])) * (2 if dtype == "fp32" else 1)
    return n


def test_head_dim_160_fp16_configs_fit_an_rtx_30xx_without_spilling():
    """The smallest shared memory of the three (sm86: 99 KB) at the largest head dim (SD 1.x's 160)."""
    proc, rows = _compile("--arch", "86", "--head-dim", "160", "--dtype", "fp16", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) == _expected([86], [160], ["fp16"]) >= 1
    for r in rows:
        assert r["shared"] <= r["limit"] and r["shared"] <= r["listed_shared"] and r["spill_bytes"] == 0, r


@pytest.mark.slow
def test_every_config_every_head_dim_every_dtype_for_sm80_sm86_sm90():
    proc, rows = _compile(timeout=3600)
    bad = [r for r in rows if r["problem"]]
    assert proc.returncode == 0 and not bad, (bad, proc.stderr[-3000:])
    assert len(rows) == _expected([80, 86, 90], [40, 64, 80, 160], ["fp16", "bf16", "fp32"])
