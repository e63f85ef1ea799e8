"""Every Triton attention config the autotuner can be given, compiled offline for sm80, sm86 and sm90
(Triton's compiler and the ptxas in its wheel; no GPU), at each SD head dim and dtype: none may need more
shared memory than its architecture allows (or than the config table lists), none may spill registers.
The tests run under TRITON_INTERPRET=1; triton_static builds GPU kernels from the interpreted kernel's source."""
import pytest

from conftest import HAVE_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed (pip install 'fastsd[triton]')")


@pytest.fixture(autouse=True)
def _fp_fusion_default(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning


def _expected(archs, head_dims, dtypes):
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT, padded_head_dim, usable_configs
    n = 0
    for arch in archs:
        for dtype in dtypes:
            for block_d in {padded_head_dim(d) for d in head_dims}:
                n += len(usable_configs(block_d, dtype == "fp32", ARCH_SMEM_LIMIT[arch])) * (2 if dtype == "fp32" else 1)
    return n


def test_head_dim_160_fp16_configs_fit_an_rtx_30xx_without_spilling(tmp_path, monkeypatch):
    """The smallest shared memory of the three (sm86: 99 KB) at the largest head dim (SD 1.x's 160).
    With an empty Triton cache, so every config really compiles (a warm cache once hid a failure)."""
    from fastsd.kernels.triton_static import check

    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    rows = check([86], [160], ["fp16"])
    assert any(cache.rglob("*.cubin")), "nothing was compiled into the empty cache"
    assert len(rows) == _expected([86], [160], ["fp16"]) >= 1
    for r in rows:
        assert r.shared <= r.limit and r.shared <= r.listed_shared and r.spill_bytes == 0 and not r.problem, r


@pytest.mark.slow
def test_every_config_every_head_dim_every_dtype_for_sm80_sm86_sm90(capsys):
    from fastsd.kernels.triton_static import main

    code = main(["--json"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("{")]
    assert code == 0, "\n".join(line for line in out.splitlines() if "FAIL" in line or '"problem": "' in line
                                and '"problem": ""' not in line)
    assert len(rows) == _expected([80, 86, 90], [40, 64, 80, 160], ["fp16", "bf16", "fp32"])
