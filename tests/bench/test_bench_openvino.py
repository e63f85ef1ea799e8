"""`fastsd bench` with the OpenVINO peer and --profile items; honest numbers: a requested configuration that
fails is exit 1 with its reason, only what cannot run here is skipped, and component figures are checked
against the whole run."""
import contextlib
import io
import json

import pytest

from fastsd.cli import main
from fastsd.bench.harness import consistency

pytest.importorskip("openvino")


def _bench(tmp_path, *extra):
    out = tmp_path / "b.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "--threads", "1", "--quiet",
                   "--no-safety-checker", "--json", str(out), *extra])
    return rc, stdout.getvalue(), stderr.getvalue(), (json.loads(out.read_text()) if out.exists() else None)


def test_openvino_and_profiles_side_by_side(tmp_path):
    from fastsd.profiles import profile_flags
    rc, out, err, report = _bench(tmp_path, "--backends", "diffusers,openvino,onnxruntime", "--dtype", "fp32,bf16",
                                  "--profile", "fastest")
    assert rc == 0, err
    names = [c["name"] for c in report["configs"]]
    assert names[:3] == ["diffusers fp32", "openvino fp32", "openvino bf16"] or \
        names[:3] == ["diffusers fp32", "openvino fp32", "profile fast: openvino bf16"]
    assert "onnxruntime fp32" in names
    assert [s["config"] for s in report["skipped"]] == ["onnxruntime bf16"]  # no bf16 kernels: cannot run
    assert report["failed"] == []
    fastest = [c for c in report["configs"] if c["profile"] == "fastest"]
    assert len(fastest) == 1 and fastest[0]["flags"]["cache_interval"] == profile_flags("fastest", "cpu")["cache_interval"]
    assert isinstance(report["machine"]["amx"], bool)
    assert ("AMX yes" if report["machine"]["amx"] else "AMX no") in out and "openvino 2026" in out
    for c in report["configs"]:
        row = c["batches"]["1"]
        assert row["consistency"]["expected_s"] > 0 and isinstance(row["consistency"]["ok"], bool)
        if not c["baseline"]:
            assert row["parity"]["passed"], (c["name"], row["parity"])
    ov = next(c for c in report["configs"] if c["name"] == "openvino fp32")
    assert ov["describe"]["inference_precision"]["unet"] == "f32" and ov["describe"]["static_shapes"]


def test_a_requested_config_that_fails_is_exit_1(tmp_path):
    # step caching cannot run in the openvino backend: an error of the request, not of the machine
    rc, out, err, report = _bench(tmp_path, "--backends", "diffusers,openvino", "--set", "cache_interval=2")
    assert rc == 1
    assert report["failed"][0]["config"].startswith("openvino fp32") and "cache_interval" in report["failed"][0]["reason"]
    assert "error: openvino fp32" in err and "FAILED openvino fp32" in out


def test_components_checked_against_the_whole_run():
    row = {"components": {"text_encoder": {"median_s": 0.1}, "unet_step": {"median_s": 1.0},
                          "vae_decode": {"median_s": 2.0}, "safety_checker": {"skipped": "none"}},
           "end_to_end": {"median_s": 7.2}}
    ok = consistency(row, 5, text_in_e2e=True)
    assert ok["ok"] and ok["expected_s"] == pytest.approx(7.1)
    row["end_to_end"]["median_s"] = 0.05 * 7.1  # components 20x slower than the whole run: load, not speed
    bad = consistency(row, 5, text_in_e2e=True)
    assert not bad["ok"] and "disagree" in bad["note"]
