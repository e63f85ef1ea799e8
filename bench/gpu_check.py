"""One-command self-check of fastsd's GPU paths, for a bare machine with a GPU and a CUDA torch.

    python -m fastsd.bench.gpu_check --quick --out DIR --budget-s 300

Each section runs in a process of its own with a time limit (its share of --budget-s, at most its own
limit), writes DIR/<NN>-<section>.json as its rows come in (so a killed or crashed run leaves what it did),
and gets a one-line verdict: PASS, FAIL, SKIP (what it needs is missing, with the reason), TIMEOUT or CRASH.
Sections (gpu_sections.py, gpu_engine.py):
  environment   GPUs, torch/CUDA, triton against the version torch asks for, onnxruntime's version
  kernels       the Triton attention kernel against SDPA and the FP32 reference, per SD head dim (40, 64,
                80, 160), self- and cross-attention
  fused         Triton GroupNorm+SiLU (NCHW and channels_last) and GEGLU against torch
  cuda_graphs   capture and replay on every visible GPU, two batch sizes, replays on new inputs, two threads
  onnxruntime   the CUDA and TensorRT providers on an export, against PyTorch FP32, placement on cuda:N
  engine        SD 1.5 and SD 2.1 (random weights, fp16) with Triton attention, fused ops and CUDA graphs
                together, against diffusers' fp16 and fp32 pipelines
  lora          a LoRA set under fused QKV against the same set without fused ops
  timings       the engine against diffusers' fp16 pipeline, seconds per image
DIR/summary.json lists every section's verdict; DIR/gpu_check.md is the same for people. Exit 0 when no
section failed, timed out or crashed. On a machine without a CUDA device it says it skipped and exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

# name, "module:function", limit with --quick (s), limit without (s)
SECTIONS = [
    ("environment", "fastsd.bench.gpu_sections:environment", 20, 40),
    ("kernels", "fastsd.bench.gpu_sections:kernels", 50, 180),
    ("fused", "fastsd.bench.gpu_sections:fused", 25, 90),
    ("cuda_graphs", "fastsd.bench.gpu_sections:cuda_graphs", 30, 90),
    ("onnxruntime", "fastsd.bench.gpu_sections:onnxruntime", 35, 150),
    ("engine", "fastsd.bench.gpu_engine:engine", 75, 300),
    ("lora", "fastsd.bench.gpu_engine:lora", 25, 60),
    ("timings", "fastsd.bench.gpu_engine:timings", 40, 240),
]
MIN_SECTION_S = 10  # a section given less than this is skipped ("time budget spent")
WRITE_MARGIN_S = 4  # a section stops starting work this long before its limit, to write its results


# -- inside a section's process ------------------------------------------------------------------------
class Section:
    """What a section function gets: where to run, how long it has, and `row`/`skip`/`note` to report.
    Every report rewrites the section's JSON file at once (atomically)."""

    def __init__(self, name: str, path: Path, device: str, quick: bool, deadline: float):
        """deadline: wall-clock time (time.time()) at which the driver kills this process; the process's
        own start-up (imports, CUDA context) counts against it."""
        self.name, self.path, self.quick = name, path, quick
        self.device = torch.device(device)
        self.devices = ([torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
                        if self.device.type == "cuda" else [self.device])
        self.started = time.monotonic()
        self.deadline = deadline - WRITE_MARGIN_S
        self.data = {"section": name, "status": "running", "device": device, "quick": quick, "rows": [],
                     "skipped": [], "notes": {}, "seconds_left_at_start": round(self.left(), 1)}
        self.write()

    def left(self) -> float:
        return self.deadline - time.time()

    def enough(self, seconds: float, what: str) -> bool:
        """True when `seconds` are left; else records `what` as skipped for want of time."""
        if self.left() >= seconds:
            return True
        self.skip(f"{what}: time limit ({self.left():.0f} s left, needs ~{seconds:.0f} s)")
        return False

    def row(self, **row) -> dict:
        self.data["rows"].append(row)
        self.write()
        return row

    def skip(self, reason: str) -> None:
        self.data["skipped"].append(reason)
        self.write()

    def note(self, **notes) -> None:
        self.data["notes"].update(notes)
        self.write()

    def finish(self, error: str | None = None) -> dict:
        rows = self.data["rows"]
        failed = [r for r in rows if r.get("passed") is False]
        if error:
            self.data["error"] = error
        self.data["status"] = "fail" if failed or error else "pass" if rows else "skip"
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        self.write()
        return self.data

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_section(name: str, spec: str, out: Path, device: str, quick: bool, deadline: float) -> int:
    section = Section(name, out, device, quick, deadline)
    module, func = spec.split(":")
    try:
        getattr(importlib.import_module(module), func)(section)
    except Exception:
        lines = traceback.format_exc().strip().splitlines()
        section.finish(error=" | ".join(lines[-3:])[:600])
        return 1
    section.finish()
    return 0


# -- the driver --------------------------------------------------------------------------------------
@dataclass
class Plan:
    name: str
    spec: str
    limit: float


REHEARSAL_SLOWDOWN = 8  # --rehearse: the CPU runs the tiny model in the Triton interpreter, with slower start-up


def plan(quick: bool, only: list[str] | None = None, slowdown: float = 1) -> list[Plan]:
    chosen = [Plan(n, s, (q if quick else f) * slowdown) for n, s, q, f in SECTIONS if not only or n in only]
    if only and len(chosen) != len(set(only)):
        known = ", ".join(n for n, *_ in SECTIONS)
        raise SystemExit(f"gpu_check: --only takes section names ({known}), not {','.join(only)}")
    return chosen


def share(left: float, limits: list[float]) -> float:
    """The time the first of `limits` gets from `left` seconds: its own limit, or its proportional share
    when the budget cannot pay every remaining limit (so the later sections still get theirs)."""
    total = sum(limits)
    return max(0.0, min(limits[0], left * limits[0] / total if total else 0.0))


def verdict(data: dict) -> str:
    status = data.get("status", "crash").upper()
    rows = data.get("rows", [])
    head = f"gpu_check [{data.get('section')}] {status:<7}"
    if status == "PASS":
        checked = sum(1 for r in rows if "passed" in r)
        done = f"{checked} checks passed, {len(rows)} rows" if checked else f"{len(rows)} rows (measurements)"
        return f"{head} {done} in {data.get('seconds', '?')} s" + (
            f"; skipped {len(data['skipped'])}: {data['skipped'][0]}" if data.get("skipped") else "")
    if status == "FAIL":
        bad = [r for r in rows if r.get("passed") is False]
        what = data.get("error") or "; ".join(r.get("what", "") + (" " + r["error"] if r.get("error") else "")
                                               for r in bad[:2])
        return f"{head} {len(bad)} of {len(rows)} failed: {what[:240]}"
    if status == "SKIP":
        return f"{head} {'; '.join(data.get('skipped', []))[:240] or 'nothing to check'}"
    return f"{head} {data.get('error', '')[:240]} ({len(rows)} rows written before)"


def launch(cmd: list[str], seconds: float, env: dict | None) -> tuple[int | None, list[str]]:
    """Run one section's process; (exit code, or None when it was killed at `seconds`; its last lines)."""
    try:
        proc = subprocess.run(cmd, timeout=seconds, capture_output=True, text=True, env=env)
        return proc.returncode, (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired as e:
        return None, _text(e.stderr).strip().splitlines()[-3:]


def run_all(plans: list[Plan], out: Path, device: str, quick: bool, budget_s: float, *,
            env: dict | None = None, echo=print, run=launch) -> dict:
    """Run each planned section in a child process with its share of the budget; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + budget_s
    results: list[dict] = []
    summary: dict = {}
    for i, p in enumerate(plans):
        path = out / f"{i:02d}-{p.name}.json"
        path.unlink(missing_ok=True)
        seconds = share(end - time.monotonic(), [q.limit for q in plans[i:]])
        if seconds < MIN_SECTION_S:
            data = {"section": p.name, "status": "skip", "rows": [],
                    "skipped": [f"time budget spent ({budget_s:.0f} s)"], "seconds": 0}
            path.write_text(json.dumps(data, indent=1))
        else:
            cmd = [sys.executable, "-m", "fastsd.bench.gpu_check", "--section", p.name, "--spec", p.spec,
                   "--section-out", str(path), "--device", device,
                   "--section-deadline", f"{time.time() + seconds:.3f}"]
            if quick:
                cmd.append("--quick")
            t0 = time.monotonic()
            rc, tail = run(cmd, seconds, env)
            data = json.loads(path.read_text()) if path.is_file() else {"section": p.name, "rows": []}
            if rc is None:
                data.update(status="timeout", error=f"killed at its limit of {seconds:.0f} s")
            elif data.get("status") in (None, "running"):
                data.update(status="crash", error=f"exit code {rc}: {' | '.join(tail)[:400]}")
            data["wall_s"] = round(time.monotonic() - t0, 1)
            path.write_text(json.dumps(data, indent=1, default=str))
        data["file"] = path.name
        results.append(data)
        echo(verdict(data))
        summary = write_summary(out, results, device, quick, budget_s)  # after each: a killed run keeps it
    return summary


def write_summary(out: Path, results: list[dict], device: str, quick: bool, budget_s: float) -> dict:
    bad = [r["section"] for r in results if r.get("status") in ("fail", "timeout", "crash")]
    summary = {"device": device, "quick": quick, "budget_s": budget_s, "failed": bad,
               "sections": {r["section"]: {"status": r.get("status"), "file": r["file"], "line": verdict(r)}
                            for r in results}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(markdown(results))
    return summary


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def markdown(results: list[dict]) -> str:
    lines = ["# fastsd gpu_check", ""] + [f"- {verdict(r)}" for r in results] + [""]
    for r in results:
        lines += [f"## {r['section']} ({r.get('status')})", ""]
        rows = r.get("rows") or []
        if r.get("notes"):
            lines += ["```", json.dumps(r["notes"], indent=1, default=str), "```", ""]
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row if not isinstance(row[k], dict)))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
            lines.append("")
        lines += [f"- skipped: {s}" for s in r.get("skipped", [])] + ([""] if r.get("skipped") else [])
    return "\n".join(lines)


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "/")


def cuda_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return False, f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"
    return True, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu_check", help="folder for the section files and summary.json")
    p.add_argument("--device", default="cuda:0", help="the GPU for the one-device sections (default cuda:0)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all sections together (default: 300 with --quick, else 900)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps: within 5 minutes")
    p.add_argument("--only", help="comma list of sections to run")
    p.add_argument("--rehearse", action="store_true",
                   help="run every section on the CPU with the tiny model (Triton interpreter, no CUDA graphs) to "
                        "check this harness; says nothing about a GPU")
    p.add_argument("--section", help=argparse.SUPPRESS)  # the child process of one section
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    p.add_argument("--section-deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        return run_section(args.section, args.spec, Path(args.section_out), args.device, args.quick,
                           args.section_deadline)
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else 900.0) * (
        REHEARSAL_SLOWDOWN if args.rehearse else 1)
    plans = plan(args.quick, args.only.split(",") if args.only else None,
                 REHEARSAL_SLOWDOWN if args.rehearse else 1)
    out = Path(args.out)
    if args.rehearse:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        summary = run_all(plans, out, "cpu", args.quick, budget, env=env)
        print(f"gpu_check --rehearse: {len(summary['failed'])} of {len(plans)} sections failed on the CPU "
              f"({', '.join(summary['failed']) or 'none'}); results in {out}/")
        return 1 if summary["failed"] else 0
    ok, why = cuda_status()
    if not ok:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"skipped": why, "sections": {}}, indent=1))
        print(f"gpu_check: skipped, for want of a GPU: {why}. Run it on a machine with an NVIDIA GPU.")
        return 0
    device = torch.device(args.device)
    if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
        print(f"gpu_check: --device must be cuda or cuda:N with N < {torch.cuda.device_count()}, not {args.device}",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = run_all(plans, out, str(device), args.quick, budget)
    print(f"gpu_check: {len(summary['failed'])} of {len(plans)} sections failed ({', '.join(summary['failed']) or 'none'}); "
          f"{time.monotonic() - t0:.0f} s of a {budget:.0f} s budget; results in {out}/")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
