"""Load test of a running deployment's REST gateway with a real load generator (locust, headless) at a
multiple of its measured capacity.

    python -m fastsd.bench.loadtest --deployment NAME --factor 2 --seconds 60 --steps 4

1. Capacity: `replicas x images per engine call` clients send requests back to back for `--probe-seconds`;
   capacity is the requests per second they got answered.
2. Load: `offered x PACING` locust users, each waiting a random time of mean PACING seconds (exponential)
   after each answer, so the requests arrive as a Poisson stream of about `--factor` x capacity whatever
   the answers are (answers are short beside PACING; `sent` shows what was offered in the end). Locust
   runs in its own process (bench/locustfile.py), which writes every answer to a JSON file; it waits for
   requests in flight when the time is up, so none is cut off by the generator.
3. The table: offered load, requests sent, accepted (200), shed (429/503 with Retry-After), other answers,
   lost (no HTTP answer), and the latency of the accepted ones (p50, p99, max).

The pass condition of issue 24 (`check`): every request answered 200, or 429/503 with Retry-After; no other
5xx; none lost; p99 of the accepted under the deployment's --timeout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from fastsd.serving.client import running_spec
from fastsd.serving.processes import TOKEN_ENV
from fastsd.serving.slowloris import KEEP_ALIVE_S

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PACING = 2.0  # mean seconds a user waits between an answer and its next request


def post(url: str, steps: int, token: str | None, timeout: float) -> int:
    body = json.dumps({"input_data": {"data": ["a red circle"], "parameters": {"num_inference_steps": steps}}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body.encode(), headers), timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def capacity(url: str, clients: int, seconds: float, steps: int, token: str | None, timeout: float) -> float:
    """Requests per second answered to `clients` closed-loop clients (each sends its next at once)."""
    done, end = [], time.monotonic() + seconds

    def client():
        while time.monotonic() < end:
            if post(url, steps, token, timeout) == 200:
                done.append(time.monotonic())
    post(url, steps, token, timeout)  # warm
    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return len(done) / max(1e-9, time.monotonic() - t0)


def percentile(values: list[float], q: float) -> float | None:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))] if v else None


def summarise(records: list[dict], offered: float, seconds: float) -> dict:
    ok = [r["seconds"] for r in records if r["status"] == 200]
    shed = [r for r in records if r["status"] in (429, 503)]
    return {"offered_rps": round(offered, 2), "seconds": seconds, "sent": len(records), "accepted": len(ok),
            "shed": len(shed), "shed_with_retry_after": sum(1 for r in shed if r.get("retry_after")),
            "other": sum(1 for r in records if r["status"] not in (200, 429, 503) and r["status"]),
            "other_5xx": sum(1 for r in records if r["status"] >= 500 and r["status"] != 503),
            "lost": sum(1 for r in records if not r["status"]),
            "lost_errors": sorted({r.get("error") or "?" for r in records if not r["status"]})[:3],  # the client's
            "accepted_rps": round(len(ok) / seconds, 2),
            "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99), "max_s": max(ok) if ok else None}


def run(name: str, factor: float = 2.0, seconds: float = 60.0, steps: int = 4, probe_seconds: float = 10.0,
        token: str | None = None, rate: float | None = None) -> dict:
    """Measures capacity (unless `rate` gives it), offers `factor` x that for `seconds`; returns the summary."""
    spec = running_spec(name)
    url = f"http://127.0.0.1:{spec.rest_port}/score"
    running = len(spec.replicas) * spec.max_images_per_call
    cap = rate or capacity(url, running, probe_seconds, steps, token, spec.limits.timeout + 5)
    offered = factor * cap
    users = max(2, round(offered * PACING))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        env = dict(os.environ, FASTSD_LOAD_PACING=str(users / offered), FASTSD_LOAD_STEPS=str(steps),
                   FASTSD_LOAD_OUT=str(out),
                   FASTSD_LOAD_REOPEN_AFTER=str(KEEP_ALIVE_S - 1), **({"FASTSD_LOAD_TOKEN": token} if token else {}))
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r",
                f"{offered:.3f}", "--run-time", f"{seconds:g}s", "--stop-timeout", f"{spec.limits.timeout + 10:g}",
                "--host", f"http://127.0.0.1:{spec.rest_port}", "--only-summary", "--loglevel", "WARNING"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=seconds + spec.limits.timeout + 120)
        if not out.exists():
            raise RuntimeError(f"locust wrote no records (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        records = json.loads(out.read_text())
    summary = summarise(records, offered, seconds)
    summary.update(capacity_rps=round(cap, 2), users=users, steps=steps, timeout_s=spec.limits.timeout,
                   replicas=len(spec.replicas), max_queue=spec.queue_limit)
    return summary


def check(summary: dict) -> list[str]:
    """What breaks issue 24's bar, as lines; empty when it holds."""
    bad = []
    if summary["other"] or summary["other_5xx"]:
        bad.append(f"{summary['other']} answers other than 200/429/503 ({summary['other_5xx']} other 5xx)")
    if summary["shed"] != summary["shed_with_retry_after"]:
        bad.append(f"{summary['shed'] - summary['shed_with_retry_after']} refusals without Retry-After")
    if summary["lost"]:
        bad.append(f"{summary['lost']} requests lost (no HTTP answer: {'; '.join(summary.get('lost_errors') or [])})")
    if summary["p99_s"] is not None and summary["p99_s"] >= summary["timeout_s"]:
        bad.append(f"p99 of the accepted {summary['p99_s']:.2f} s is not under --timeout {summary['timeout_s']:g} s")
    if not summary["accepted"]:
        bad.append("no request was accepted")
    return bad


def table_row(s: dict) -> str:
    return (f"| {s['capacity_rps']:.2f} | {s['offered_rps']:.2f} ({s['offered_rps'] / s['capacity_rps']:.1f}x) | "
            f"{s['seconds']:g} | {s['sent']} | {s['accepted']} ({s['accepted_rps']:.2f}/s) | {s['shed']} | "
            f"{s['other']} | {s['lost']} | {s['p50_s']:.2f} | {s['p99_s']:.2f} | {s['max_s']:.2f} |")


TABLE_HEAD = ("| capacity req/s | offered req/s | s | sent | accepted (200) | shed (429/503) | other | lost | "
              "p50 s | p99 s | max s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployment", "-d", required=True)
    ap.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity (default 2)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per request (default 4)")
    ap.add_argument("--probe-seconds", type=float, default=10.0)
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV))
    args = ap.parse_args(argv)
    s = run(args.deployment, args.factor, args.seconds, args.steps, args.probe_seconds, args.token)
    print(TABLE_HEAD)
    print(table_row(s))
    print(json.dumps(s))
    bad = check(s)
    for line in bad:
        print("FAIL:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
