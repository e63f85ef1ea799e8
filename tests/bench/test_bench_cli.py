"""Smoke test of `fastsd bench` on the tiny model: the table and the JSON are complete and well formed.
No speed is asserted (the machine is shared); only that everything is measured and reported."""
import json
import math

import pytest

from fastsd.cli import main

CONFIGS = ["diffusers fp32", "torch fp32", "torch bf16"]
COMPONENTS = ["text_encoder", "unet_step", "vae_decode", "safety_checker"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / f"bench.{k}" for k in ("json", "png", "md")}
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "--threads", "1",
                   "--backends", "diffusers,torch,onnxruntime", "--dtype", "fp32,bf16", "--batch", "1,2",
                   "--json", str(paths["json"]), "--plot", str(paths["png"]), "--markdown", str(paths["md"])])
    return rc, stdout.getvalue(), stderr.getvalue(), paths


def test_exit_code_and_files(bench_run):
    rc, _, _, paths = bench_run
    assert rc == 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "fastsd bench --model tiny" in md.split("```")[1]  # the command that regenerates it, at the top
    assert "torch bf16" in md


def test_json_is_complete(bench_run):
    _, _, _, paths = bench_run
    report = json.loads(paths["json"].read_text())  # strict JSON: no NaN/Infinity
    names = [c["name"] for c in report["configs"]]
    assert names[:3] == CONFIGS and set(names[3:]) <= {"onnxruntime fp32", "onnxruntime bf16"}
    assert report["configs"][0]["baseline"]
    for key in ("cpu", "cpu_flags", "logical_cores", "torch_threads", "load_average_start"):
        assert key in report["machine"]
    assert report["machine"]["torch_threads"] == 1
    for key in ("torch", "diffusers", "transformers", "onnxruntime", "fastsd"):
        assert key in report["versions"]
    assert report["settings"]["steps"] == 2 and report["settings"]["unet_calls"] >= 2
    assert set(report["shapes"]) == {"1", "2"}
    assert report["shapes"]["2"]["unet_step"]["sample"][0] == 4  # guidance batched: 2 per image
    # onnxruntime is either measured or skipped with its one-line reason, never silently dropped
    onnx = [c for c in report["configs"] if c["backend"] == "onnxruntime"]
    skipped = [s for s in report["skipped"] if s["config"].startswith("onnxruntime")]
    assert len(onnx) + len(skipped) == 2 and all(s["reason"] and "\n" not in s["reason"] for s in skipped)
    for c in report["configs"]:
        assert c["peak_memory"]["peak_mb"] > 0 and c["build_s"] >= 0
        for b in ("1", "2"):
            row = c["batches"][b]
            for comp in COMPONENTS:
                st = row["components"][comp]
                if "skipped" in st:  # the tiny model has no safety checker
                    assert comp == "safety_checker"
                    continue
                assert len(st["runs_s"]) == 1 and len(st["warmup_s"]) == 1
                assert 0 < st["min_s"] <= st["median_s"] <= st["p90_s"]
                assert st["speedup"] > 0
            e2e = row["end_to_end"]
            assert e2e["median_s"] > 0 and e2e["speedup"] > 0 and e2e["steps"] == 2
            assert row["images_per_s"] == pytest.approx(int(b) / e2e["median_s"])
            assert row["end_to_end_estimate"]["seconds"] > 0
            if c["baseline"]:
                assert row["parity"] == {"reference": True}
                assert row["components"]["unet_step"]["speedup"] == 1.0
            else:
                p = row["parity"]
                psnr = math.inf if p["psnr_db"] == "inf" else p["psnr_db"]
                assert psnr > 20 and p["latent_cosine"] > 0.9 and isinstance(p["passed"], bool)
                assert len(p["images"]) == int(b)
    fp32 = report["configs"][1]["batches"]["1"]["parity"]
    assert fp32["passed"]  # same maths in FP32: within the fp32 tolerance of diffusers


def test_table_is_complete(bench_run):
    _, out, err, _ = bench_run
    for word in ("machine:", "versions:", "torch 2.", "diffusers 0.", "shapes (batch 1)", "shapes (batch 2)",
                 "batch 1", "batch 2", "text encoder ms", "UNet step ms", "VAE decode ms", "safety checker ms",
                 "e2e 2 steps s", "img/s", "resident MB", "PSNR dB", "latent cos", "min-p90", "warm-up"):
        assert word in out, word
    for name in CONFIGS:
        assert name in out
    assert "onnxruntime" in out  # measured, or on a "skipped ..." line with its reason
    assert "1.00x" in out and "reference" in out and "pass (bf16" in out
    assert "end to end" in err  # the progress bar said what it was measuring


def test_bad_option_is_one_line(capsys):
    assert main(["bench", "--model", "tiny", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype" in err[0]
    assert main(["bench", "--model", "tiny", "--backends", "tensorrt"]) == 2


def test_from_json_renders_the_same_tables(bench_run, tmp_path, capsys):
    _, out, _, paths = bench_run
    md = tmp_path / "again.md"
    assert main(["bench", "--from-json", str(paths["json"]), "--markdown", str(md)]) == 0
    again = capsys.readouterr().out
    assert again.split("batch 1", 1)[1] == out.split("batch 1", 1)[1]  # same tables, nothing re-measured
    assert md.read_text().startswith("# fastsd bench")


def test_backend_item_carries_its_own_flags(capsys):
    """`openvino:int8=hybrid` sets int8 on that backend's configurations only (int8 exists only there)."""
    from fastsd.bench.cli import settings_from_args
    from fastsd.cli import build_parser
    args = build_parser().parse_args(["bench", "--model", "tiny", "--backends", "diffusers,torch,openvino:int8=hybrid",
                                      "--dtype", "bf16"])
    names = [c.name for c in settings_from_args(args).configs]
    assert names == ["diffusers fp32", "torch bf16", "openvino bf16 [int8=hybrid]"]
    assert main(["bench", "--model", "tiny", "--backends", "diffusers,openvino:int9=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backends" in err[0] and "int9=x" in err[0]
