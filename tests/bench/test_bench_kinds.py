"""`python -m fastsd.bench.kinds`: the diffusers baseline and the engine, one row each, on the tiny upscaler."""
import json

from fastsd.bench.kinds import main


def test_bench_kinds_rows(tmp_path, capsys):
    out, md = tmp_path / "k.json", tmp_path / "r.md"
    md.write_text("# results\n")
    assert main(["--model", "tiny-upscaler", "--input", "16", "--steps", "2", "--repeat", "1", "--json", str(out),
                 "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    base, fast = report["rows"]
    assert report["kind"] == "upscale" and base["config"].startswith("diffusers") and fast["output"] == "64x64"
    assert fast["identical"] and fast["s_per_image"] > 0 and fast["unet_step_ms"] > 0
    text = md.read_text()
    assert "python -m fastsd.bench.kinds --model tiny-upscaler" in text and "16x16 -> 64x64" in text
    assert "| tiny-upscaler | upscale |" in capsys.readouterr().out
