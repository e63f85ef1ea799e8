"""What `fastsd status` reports about a deployment, read from its files (spec.json, state.json,
replica-I.json, balancer.json; see folders.py) without talking to any of its processes. The metrics
exporter (metrics.py) reads the same figures through `status`, so the two agree by construction."""
from __future__ import annotations

import time
from pathlib import Path

from .errors import ServingError
from .folders import cache_path, check_name, read_json
from .processes import is_ours, pid_alive
from .spec import SPEC_FILE, DeploymentSpec


def running_state(ddir: Path) -> dict | None:
    """state.json when the deployment's supervisor is alive, else None."""
    state = read_json(ddir / "state.json")
    if state and state.get("status") != "stopped" and is_ours(state.get("supervisor_pid"), ddir):
        return state
    return None


def status(name: str) -> dict:
    check_name(name)
    ddir = cache_path() / name
    spec = DeploymentSpec.read(ddir)
    if spec is None:
        raise ServingError(f"no deployment named '{name}' in {ddir.parent}")
    state = read_json(ddir / "state.json") or {}
    running = running_state(ddir) is not None
    lb = read_json(ddir / "balancer.json") or {}
    kids = state.get("children", {})
    now = time.time()
    reps, totals = [], {}
    for i, r in enumerate(spec.replicas):
        info = read_json(ddir / f"replica-{i}.json") or {}
        child = kids.get(f"replica-{i}", {})
        alive = running and pid_alive(child.get("pid"))  # for a remote replica: its ssh session
        if r.local:
            this_run = info.get("pid") == child.get("pid")
        else:  # started after its ssh session was
            this_run = (info.get("started_at") or 0) >= (child.get("started_at") or 0) - 5
        lb_up = lb.get("up") or []
        reachable = bool(lb_up[i]) if i < len(lb_up) else True  # as the load balancer's health check sees it
        health = (lb.get("health") or [])[i] if i < len(lb.get("health") or []) else {}
        up = bool(alive and info.get("ready") and this_run and reachable)
        stats = info.get("stats", {})
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not k.startswith("max_"):
                totals[k] = totals.get(k, 0) + v
            elif isinstance(v, dict):
                continue  # histograms: per replica only
            elif k.startswith("max_"):
                totals[k] = max(totals.get(k, 0), v)
        reps.append({"index": i, "host": r.host, "port": r.port, "pid": child.get("pid"),
                     "state": "up" if up else ("stalled" if alive and health.get("state") == "stalled"
                                               else "unreachable" if alive and info.get("ready") and this_run
                                               else "starting" if alive else "down"),
                     "health": health.get("why") or None,
                     "restarts": child.get("restarts", 0),
                     "cuda_visible_devices": r.cuda_visible_devices,
                     "uptime_s": round(now - info["ready_at"], 1) if up and info.get("ready_at") else None,
                     "reachable": reachable, "queue_depth": info.get("queue_depth", 0) if up else 0,
                     "engine": info.get("engine"), "phase": info.get("phase"), "batching": info.get("batching"),
                     **stats})
    engine = next((r["engine"] for r in reps if r.get("engine")), None) or {}
    # a state file that says running with no supervisor alive: it was killed (its children end themselves)
    return {"name": name, "status": "running" if running else ("dead" if state.get("status") in ("running", "stopping")
                                                              else "stopped"),
            "model": spec.model, "backend": engine.get("backend", spec.engine.get("backend", "torch")),
            "device": engine.get("device"), "dtype": engine.get("dtype"), "host": spec.host, "port": spec.port,
            "rest_port": spec.rest_port, "ui_port": spec.ui_port, "token_required": spec.token_required,
            "supervisor_pid": state.get("supervisor_pid") if running else None,
            "uptime_s": round(now - state["started_at"], 1) if running and state.get("started_at") else None,
            "max_batch": spec.max_batch, "max_batch_limit": spec.max_batch_limit,
            "batch_min_gain": spec.batch_min_gain, "batch_window_ms": spec.batch_window_ms,
            "limits": spec.limits.to_dict(),
            "requests_served": totals.get("requests", 0), "totals": totals, "replicas": reps,
            "balancer": {k: lb.get(k) for k in ("requests", "ok", "failovers", "errors", "forwarded", "up",
                                                "waited_for_replica", "marked_down", "in_flight", "images",
                                                "codes", "latency", "shed", "cancelled", "health", "admission")},
            "max_queue": spec.queue_limit,
            "metrics_port": spec.metrics_port, "log_format": spec.log_format,
            "rest": kids.get("rest"), "dir": str(ddir), "mii_cache_path": str(ddir.parent),
            "lora_dir": spec.lora_dir, "lora_default": [list(x) for x in spec.loras],
            "lora_active": [(read_json(ddir / f"replica-{i}.json") or {}).get("loras") for i in range(len(reps))],
            "lora_invalid": {k: v for i in range(len(reps)) for k, v in
                             (((read_json(ddir / f"replica-{i}.json") or {}).get("lora_catalog") or {})
                              .get("invalid") or {}).items()}}


def list_deployments() -> list[str]:
    return sorted(p.parent.name for p in cache_path().glob(f"*/{SPEC_FILE}"))


def format_status(s: dict) -> str:
    up = sum(r["state"] == "up" for r in s["replicas"])
    lines = [f"deployment {s['name']}: {s['status']}"
             + (f", up {s['uptime_s']:.0f} s (supervisor pid {s['supervisor_pid']})"
                if s["uptime_s"] is not None else ""),
             f"  model {s['model']}  backend {s['backend']}  device {s['device']}  dtype {s['dtype']}",
             f"  gRPC (MII) {s['host']}:{s['port']}" + (f"   REST http://{s['host']}:{s['rest_port']}/score"
                                                       + (" (bearer token)" if s["token_required"] else "")
                                                       if s["rest_port"] else "   REST off")
             + (f"   page http://{s['host']}:{s['ui_port']}/" if s.get("ui_port") else ""),
             f"  replicas {up}/{len(s['replicas'])} up; requests served {s['requests_served']}; "
             f"batching: {_batching_mode(s)}, window {s['batch_window_ms']:g} ms, "
             f"{s['totals'].get('batches', 0)} engine calls, {s['totals'].get('merged_batches', 0)} merged "
             f"({s['totals'].get('merged_requests', 0)} requests shared a batch)",
             f"  {'#':>2} {'state':<8} {'pid':>7} {'port':>6} {'restarts':>8} {'requests':>8} {'images':>6} "
             f"{'batches':>7} {'merged':>6} {'bad':>4} {'uptime':>8}"]
    for r in s["replicas"]:
        lines.append(f"  {r['index']:>2} {r['state']:<8} {r['pid'] or '-':>7} {r['port']:>6} {r['restarts']:>8} "
                     f"{r.get('requests', 0):>8} {r.get('images', 0):>6} {r.get('batches', 0):>7} "
                     f"{r.get('merged_batches', 0):>6} {r.get('bad_requests', 0):>4} "
                     f"{(str(round(r['uptime_s'])) + ' s') if r['uptime_s'] is not None else '-':>8}")
    lines += _batch_size_lines(s)
    if s.get("lora_dir"):
        n, secs = s["totals"].get("lora_switches", 0), s["totals"].get("lora_switch_seconds", 0.0)
        active = ["+".join(a["active"]) or "none" if a else "none" for a in s.get("lora_active", [])]
        lines.append(f"  LoRA: {s['lora_dir']}; {n} switches, {secs:.2f} s in all"
                     + (f" ({1000 * secs / n:.0f} ms each)" if n else "") + f"; fused now: {', '.join(active)}")
        for name, why in (s.get("lora_invalid") or {}).items():
            lines.append(f"  LoRA {name}: invalid, not offered ({why})")
    b = s["balancer"]
    if b.get("requests") is not None:
        lines.append(f"  load balancer: {b['requests']} requests, {b['ok']} answered, {b['failovers']} failovers, "
                     f"{b.get('shed') or 0} shed (--max-queue {s['max_queue']}), {b.get('cancelled') or 0} cancelled, "
                     f"errors {b['errors'] or {}}")
    for r in s["replicas"]:
        if r.get("health") and r["state"] != "up":
            lines.append(f"  replica {r['index']} {r['state']}: {r['health']}")
    lines.append(f"  logs: {s['dir']}")
    return "\n".join(lines)


def _batching_mode(s: dict) -> str:
    if s["max_batch"] == "auto":
        return (f"auto (measured, up to {s.get('max_batch_limit')} images, "
                f"each step up must gain {s.get('batch_min_gain') or 0:.0%})")
    return f"max {s['max_batch']} images"


def _batch_size_lines(s: dict) -> list[str]:
    """Per replica and bucket: the batch size chosen and the images/s measured at each size."""
    lines = []
    for r in s["replicas"]:
        b = r.get("batching") or {}
        if r.get("phase") and r["state"] != "up":
            lines.append(f"  replica {r['index']}: {r['phase']}")
        if b.get("memory_budget_bytes"):
            lines.append(f"  replica {r['index']} memory share {b['memory_budget_bytes'] / 2**30:.1f} GiB "
                         f"({b.get('memory_budget_source')})")
        for c in b.get("buckets", []):
            rates = ", ".join(f"{k}: {v:.3g}" for k, v in c["images_per_s"].items()) or "none yet"
            choice = f"{c['chosen']} per call" if c["chosen"] is not None else "measuring"
            lines.append(f"  replica {r['index']} {c['bucket']}: {choice}; images/s by batch size: {rates}"
                         + (f" ({c['reason']})" if c.get("reason") else ""))
    return lines

