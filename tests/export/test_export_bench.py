"""python -m fastsd.bench.onnx in its quick mode: both engines timed, ratios and parity printed, temp folder gone."""
import os
import tempfile

from fastsd.bench.onnx import main


def test_bench_onnx_tiny_smoke(capsys, monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real_mkdtemp(*a, **kw))
        return made[-1]
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    assert main(["--preset", "tiny", "--repeat", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch eager" in out and "ORT CPU" in out and "ratio" in out
    assert out.count("x  ") >= 2  # a ratio per graph: unet, vae_decoder
    assert "onnxruntime 1." in out and "threads" in out
    assert made and not any(os.path.exists(d) for d in made if "fastsd-bench-onnx-" in d)  # export deleted
