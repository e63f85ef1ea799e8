"""`fastsd verify --attention NAME` passes against the FP32 diffusers reference (triton: interpreted)."""
import json

import pytest

from fastsd.cli import main

from conftest import needs_triton


@pytest.mark.parametrize("attention", ["sdpa", "math", pytest.param("triton", marks=needs_triton)])
def test_verify_attention_backend_passes(attention, tmp_path, capsys):
    report = tmp_path / "v.json"
    code = main(["verify", "--model", "tiny", "--attention", attention, "--steps", "3", "--quiet",
                 "--json", str(report)])
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert code == 0 and "PASS" in out, out
    assert f"'attention': '{attention}'" in out
    # fp32 tolerance: max abs <= 2 levels, PSNR >= 45 dB (fastsd/reference.py)
    assert all(r["max_abs"] <= 2 and (r["identical"] or r["psnr_db"] >= 45) for r in data["images"]), data["images"]
