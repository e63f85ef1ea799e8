"""`python -m fastsd.bench.gpu_check` on a machine without a CUDA device: says so and exits 0; its report
writer and its skip reasons work without a GPU."""
import subprocess
import sys

import torch

from fastsd.bench import gpu_check


def test_cpu_machine_says_so_and_exits_0(capsys, tmp_path):
    assert not torch.cuda.is_available()
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "nothing to check" in out
    assert not (tmp_path / "r").exists()  # nothing was measured, so no report claims anything


def test_module_entry_point_exits_0_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "fastsd.bench.gpu_check"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout, proc.stderr[-2000:]


def test_onnxruntime_section_skips_with_reasons_on_a_cpu_build():
    skipped = []
    assert gpu_check.check_onnxruntime(torch.device("cuda:0"), gpu_check.Budget(600), skipped) == []
    assert any("CUDAExecutionProvider: not in this onnxruntime build" in s for s in skipped)
    assert any("TensorrtExecutionProvider: not in this onnxruntime build" in s for s in skipped)


def test_markdown_report_has_every_section_and_the_skips():
    report = {"environment": {"gpu": "X"}, "skipped": ["triton: no CUDA"],
              "sections": {"attention": [{"backend": "sdpa", "max_abs": 1e-3, "passed": True, "shape": [2, 8, 4096, 77, 40]}],
                           "fused ops": [], "cuda graphs": "failed: RuntimeError: boom"}}
    md = gpu_check.markdown(report)
    assert "## attention" in md and "| backend | max_abs | passed | shape |" in md
    assert "| sdpa | 0.001 | True | [2, 8, 4096, 77, 40] |" in md
    assert "## fused ops" in md and "(nothing ran)" in md and "failed: RuntimeError: boom" in md
    assert "- triton: no CUDA" in md
