"""`fastsd bench --peer openvino-genai`: the peer a CPU user runs instead of fastsd (optimum-intel's export,
openvino_genai.Text2ImagePipeline with its defaults), measured in the same run and held to the same parity."""
import contextlib
import importlib.util
import io
import json
import subprocess
import sys

import pytest

from fastsd.cli import main
from fastsd.bench.peer import peer_python


def _bench(tmp_path, *extra):
    out = tmp_path / "b.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--model", "tiny", "--steps", "3", "--repeat", "1", "--threads", "1", "--quiet",
                   "--no-safety-checker", "--backends", "diffusers", "--json", str(out), *extra])
    return rc, stdout.getvalue(), stderr.getvalue(), (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("argv, name", [(["--peer", "openvino"], "peer"),
                                        (["--peer", "openvino-genai", "--peer-python", "/no/such/python"],
                                         "peer-python")])
def test_bad_peer_values_are_one_line_exit_2(tmp_path, argv, name):
    rc, out, err, report = _bench(tmp_path, *argv)
    assert rc == 2 and report is None
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0] and "allowed" in lines[0], err


def _has_optimum_intel(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('optimum.intel') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def test_peer_without_its_export_environment_is_skipped_with_the_reason(tmp_path, monkeypatch):
    if _has_optimum_intel(sys.executable):
        pytest.skip("this Python has optimum-intel: the peer would run, not skip")
    monkeypatch.setenv("FASTSD_PEER_CACHE", str(tmp_path / "cache"))
    rc, out, err, report = _bench(tmp_path, "--peer", "openvino-genai", "--peer-python", sys.executable)
    assert rc == 0, err
    assert [c["name"] for c in report["configs"]] == ["diffusers fp32"]
    (skip,) = report["skipped"]
    assert skip["config"] == "openvino-genai defaults"
    if importlib.util.find_spec("openvino_genai") is None:
        assert "openvino-genai is not installed" in skip["reason"]
    else:
        assert "optimum-intel" in skip["reason"] and sys.executable in skip["reason"]
    assert "skipped openvino-genai defaults" in err


@pytest.mark.slow  # the export alone (optimum-cli in its own environment) takes 1.5-2.5 min on 2 shared cores
def test_peer_end_to_end_against_diffusers(tmp_path, monkeypatch):
    if importlib.util.find_spec("openvino_genai") is None:
        pytest.skip("openvino-genai is not installed (pip install -e '.[peer]')")
    python = peer_python()
    if not _has_optimum_intel(python):
        pytest.skip(f"no optimum-intel in {python}: make peer-env")
    monkeypatch.setenv("FASTSD_PEER_CACHE", str(tmp_path / "cache"))
    rc, out, err, report = _bench(tmp_path, "--peer", "openvino-genai")
    assert rc == 0, err
    base, peer = report["configs"]
    assert peer["name"] == "openvino-genai defaults" and report["failed"] == [] and report["skipped"] == []
    d = peer["describe"]
    assert d["inference_precision"] in ("f32", "bf16") and d["export_versions"]["optimum-intel"]
    assert d["export_cached"] is False and peer["export_s"] > 0
    row = peer["batches"]["1"]
    # the same initial noise (TorchGenerator) and the export's own PNDM: the whole image matches diffusers' FP32
    assert row["parity"]["passed"], row["parity"]
    assert row["parity"]["latent_cosine"] > 0.999
    # its pipeline's own metrics: one duration per UNet call of each timed run (3 PNDM steps: 4 calls)
    own = row["own_metrics"]
    assert [len(r["unet_calls_s"]) for r in own["runs"]] == [report["settings"]["unet_calls"]]
    assert own["unet_call_median_s"] > 0 and own["generate_median_s"] > 0
    for comp in ("text_encoder", "unet_step", "vae_decode"):
        assert row["components"][comp]["median_s"] > 0
    assert "against the peer (batch 1)" in out and "its own perf metrics" in out
    # the export is cached: a second run builds from it
    rc, out, err, report = _bench(tmp_path, "--peer", "openvino-genai")
    assert rc == 0 and report["configs"][1]["describe"]["export_cached"] is True


def test_the_export_cache_key_is_the_same_in_every_process(tiny):
    from diffusers.configuration_utils import FrozenDict
    from fastsd.bench.peer import model_key
    key = model_key(tiny, {"optimum-intel": "2.2.0"})
    # diffusers lists the defaulted entries in set order, which differs from one process to the next
    order = list(tiny.unet.config["_use_default_values"])
    tiny.unet._internal_dict = FrozenDict({**tiny.unet.config, "_use_default_values": order[::-1]})
    assert model_key(tiny, {"optimum-intel": "2.2.0"}) == key
    assert model_key(tiny, {"optimum-intel": "2.1.0"}) != key  # another exporter: another export
    tiny.unet._internal_dict = FrozenDict({**tiny.unet.config, "sample_size": tiny.unet.config["sample_size"] * 2})
    assert model_key(tiny, {"optimum-intel": "2.2.0"}) != key


def test_peer_alone_bad_value_is_one_line_exit_2(capsys):
    from fastsd.bench.peer_alone import main as alone
    assert alone(["--repeat", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "repeat" in err[0] and "1 or more" in err[0]
