"""`python -m fastsd.bench.gpu_check`: on a machine without a CUDA device it says it skipped and exits 0; the
driver runs each section in its own process within its share of the budget, keeps what a killed or crashed
section wrote, and prints one verdict line per section; the real sections run on the CPU (`--rehearse`)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsd.bench import gpu_check, gpu_sections
from fastsd.bench.gpu_check import Plan

FAKES = "gpu_fake_sections"
HERE = Path(__file__).resolve().parent


def test_cpu_machine_says_it_skipped_and_exits_0(capsys, tmp_path):
    assert not torch.cuda.is_available()
    assert gpu_check.main(["--quick", "--out", str(tmp_path / "r"), "--budget-s", "300"]) == 0
    out = capsys.readouterr().out
    assert "skipped, for want of a GPU" in out and "torch.cuda.is_available() is False" in out
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["summary.json"]  # no section claims anything
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["sections"] == {}


def test_module_entry_point_exits_0_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastsd.bench.gpu_check", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "for want of a GPU" in proc.stdout, proc.stderr[-2000:]


def test_budget_is_shared_so_every_section_gets_its_turn():
    limits = [p.limit for p in gpu_check.plan(quick=True)]
    assert sum(limits) <= 300  # --quick fits its default budget by its own limits
    assert gpu_check.share(1000, limits) == limits[0]  # enough time: a section gets its own limit
    left, given = 150.0, []
    for i in range(len(limits)):  # half the budget: each gets half, none is starved by the ones before
        given.append(gpu_check.share(left, limits[i:]))
        left -= given[-1]
    assert sum(given) == pytest.approx(150) and all(g == pytest.approx(lim / 2) for g, lim in zip(given, limits))
    with pytest.raises(SystemExit, match="section names"):
        gpu_check.plan(quick=True, only=["kernels", "nope"])


def _inline(fakes):
    """run_all's launcher, in this process: a fake section runs through run_section (as its child would);
    `hanging` is what a killed child leaves (its partial file, no exit code)."""
    def run(cmd, seconds, env):
        args = dict(zip(cmd[3::2], cmd[4::2]))
        spec = args["--spec"]
        if spec.endswith(":hanging"):
            section = gpu_check.Section(args["--section"], Path(args["--section-out"]), "cpu", False,
                                        time.time() + seconds)
            section.row(what="written before the hang", passed=True)
            return None, []
        rc = gpu_check.run_section(args["--section"], spec, Path(args["--section-out"]), "cpu", False,
                                   float(args["--section-deadline"]))
        return rc, ["RuntimeError: CUDA error"] if rc else []
    return run


def test_verdicts_and_files_for_every_outcome(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    plans = [Plan(n, f"{FAKES}:{n}", 20) for n in ("passing", "failing", "crashing", "skipping", "hanging")]
    lines = []
    summary = gpu_check.run_all(plans, tmp_path, "cpu", True, 100, echo=lines.append, run=_inline(FAKES))
    status = {n: s["status"] for n, s in summary["sections"].items()}
    assert status == {"passing": "pass", "failing": "fail", "crashing": "fail", "skipping": "skip",
                      "hanging": "timeout"}
    assert summary["failed"] == ["failing", "crashing", "hanging"]
    assert lines[0].startswith("gpu_check [passing] PASS") and "1 checks passed, 2 rows" in lines[0]
    assert "FAIL" in lines[1] and "max abs 0.5 > 0.005" in lines[1]
    assert "illegal memory access" in lines[2]
    assert "SKIP" in lines[3] and "onnxruntime is not installed" in lines[3]
    assert "TIMEOUT" in lines[4] and "1 rows written before" in lines[4]
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["00-passing.json", "01-failing.json", "02-crashing.json", "03-skipping.json", "04-hanging.json",
                     "summary.json"]
    hung = json.loads((tmp_path / "04-hanging.json").read_text())
    assert hung["rows"] == [{"what": "written before the hang", "passed": True}]  # kept after the kill
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## failing (fail)" in md and "| what | passed | max_abs | error |" in md


def test_a_spent_budget_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    plans = [Plan("passing", f"{FAKES}:passing", 20), Plan("skipping", f"{FAKES}:skipping", 20)]
    summary = gpu_check.run_all(plans, tmp_path, "cpu", True, 15, echo=lambda line: None, run=_inline(FAKES))
    assert [s["status"] for s in summary["sections"].values()] == ["skip", "skip"]
    assert "time budget spent" in summary["sections"]["passing"]["line"]


@pytest.mark.slow
def test_child_processes_are_killed_at_their_limit_and_the_budget_holds(tmp_path):
    """The real driver: one process per section, a hanging one killed at its share, a polite one stopping
    itself before it; the whole run stays within its budget."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    plans = [Plan("passing", f"{FAKES}:passing", 60), Plan("hanging", f"{FAKES}:hanging", 60),
             Plan("polite", f"{FAKES}:slow_but_polite", 60), Plan("crashing", f"{FAKES}:crashing", 60)]
    t0 = time.monotonic()
    summary = gpu_check.run_all(plans, tmp_path, "cpu", True, 240, env=env, echo=lambda line: None)
    assert time.monotonic() - t0 <= 240 + 10
    status = {n: s["status"] for n, s in summary["sections"].items()}
    assert status == {"passing": "pass", "hanging": "timeout", "polite": "pass", "crashing": "fail"}
    polite = json.loads((tmp_path / "02-polite.json").read_text())
    assert polite["rows"] and any("time limit" in s for s in polite["skipped"])


def _section(tmp_path, name):
    deadline = time.time() + 600
    out = tmp_path / f"{name}.json"
    assert gpu_check.run_section(name, f"fastsd.bench.gpu_sections:{name}", out, "cpu", True, deadline) == 0
    return json.loads(out.read_text())


def test_rehearsal_of_the_part_sections_on_the_cpu(tmp_path):
    """The real environment, kernels, fused, cuda_graphs and onnxruntime sections, on the CPU: tiny shapes
    in the Triton interpreter, skips with reasons where a GPU is needed."""
    env = _section(tmp_path, "environment")
    assert env["status"] == "pass" and env["notes"]["torch"] == torch.__version__
    assert any(r["what"] == "triton as torch asks" for r in env["rows"])
    kernels = _section(tmp_path, "kernels")
    if gpu_sections.importlib.util.find_spec("triton") is None:
        assert kernels["status"] == "skip"
    else:
        assert kernels["status"] == "pass" and {r["shape"][-1] for r in kernels["rows"]} == {40, 64, 80, 160}
        assert all(r["max_abs"] < 1e-4 for r in kernels["rows"])
        fused = _section(tmp_path, "fused")
        assert fused["status"] == "pass" and any("channels_last" in r["what"] for r in fused["rows"])
    graphs = _section(tmp_path, "cuda_graphs")
    assert graphs["status"] == "skip" and "CUDA" in graphs["skipped"][0]
    ort = _section(tmp_path, "onnxruntime")
    assert ort["status"] == "skip" and ("no GPU provider" in ort["skipped"][0] or "not installed" in ort["skipped"][0])


@pytest.mark.slow
def test_full_rehearsal_on_the_cpu(tmp_path):
    """Every section, the engine ones included (tiny model, fp32), through the real driver."""
    proc = subprocess.run([sys.executable, "-m", "fastsd.bench.gpu_check", "--rehearse", "--quick", "--out",
                           str(tmp_path), "--budget-s", "2400"], capture_output=True, text=True, timeout=2600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["sections"].items() if s["status"] != "skip"} == {
        n: "pass" for n in ("environment", "kernels", "fused", "engine", "lora", "timings")}
