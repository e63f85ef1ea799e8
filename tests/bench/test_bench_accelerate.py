"""`fastsd bench --accelerate`: the drop-in beside the plain diffusers pipeline and fastsd's engine, in one
run, with parity against the baseline and its ratio to the engine. No speed is asserted (shared machine)."""
import contextlib
import io
import json

from fastsd.cli import main


def test_bench_accelerate_measures_the_drop_in_beside_pipeline_and_engine(tmp_path):
    out = tmp_path / "b.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "--threads", "1", "--accelerate",
                   "--dtype", "bf16", "--no-safety-checker", "-q", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    by_name = {c["name"]: c for c in report["configs"]}
    assert list(by_name) == ["diffusers fp32", "torch bf16", "accelerate bf16"]
    acc = by_name["accelerate bf16"]
    assert acc["describe"]["backend"] == "accelerate" and acc["describe"]["pipeline"] == "StableDiffusionPipeline"
    assert acc["describe"]["dtypes"] == {"unet": "bfloat16", "vae": "bfloat16", "text_encoder": "float32"}
    assert acc["batches"]["1"]["parity"]["passed"] and acc["batches"]["1"]["parity"]["psnr_db"] != "inf"
    ratios = acc["vs_engine"]
    assert ratios["engine"] == "torch bf16" and ratios["batches"]["1"]["unet_step"] > 0
    assert acc["batches"]["1"]["components"]["unet_step"]["speedup"] > 0
    text = stdout.getvalue()
    assert "drop-in vs engine" in text and "accelerate bf16 (batch 1)" in text
