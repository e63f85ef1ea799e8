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


def test_bench_accelerate_adds_the_openvino_drop_in_beside_the_openvino_engine(tmp_path):
    import pytest
    pytest.importorskip("openvino")
    out = tmp_path / "b.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "--threads", "1", "--accelerate",
                   "--backends", "diffusers,torch,openvino", "--dtype", "bf16", "--no-safety-checker", "-q",
                   "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    by_name = {c["name"]: c for c in report["configs"]}
    assert list(by_name) == ["diffusers fp32", "torch bf16", "openvino bf16", "accelerate bf16",
                             "accelerate-openvino bf16"]
    assert report["failed"] == [] and report["skipped"] == []
    ov = by_name["accelerate-openvino bf16"]
    assert ov["describe"]["applied"][-2:] == ["openvino(unet)", "openvino(vae_decoder)"]
    assert ov["describe"]["runners"]["unet"]["precision"] in ("bf16", "f32")  # f32 where the CPU lacks bf16
    assert "fastsd-bench-onnx-fp32-" in ov["describe"]["runners"]["unet"]["graph"]  # the engine's export, reused
    assert ov["batches"]["1"]["parity"]["passed"]
    assert ov["vs_engine"]["engine"] == "openvino bf16" and ov["vs_engine"]["batches"]["1"]["unet_step"] > 0
    assert by_name["accelerate bf16"]["vs_engine"]["engine"] == "torch bf16"
    assert "accelerate-openvino bf16 (batch 1)" in stdout.getvalue()
