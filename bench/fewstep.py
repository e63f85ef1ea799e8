"""`fastsd bench --few-step`: each configuration's time per image for a few-step generation (by default LCM, 4
steps, guidance 1: one UNet call per step, no classifier-free guidance; `--few-step tcd,4,1.5` times the
shipped few-step adapter's recipe) beside the run's own generation (by default 50 steps of the model's scheduler
at guidance 7.5), measured in the same run on the same built configurations, with its parity against the
diffusers baseline's own few-step images (same scheduler, steps and seeds)."""
from __future__ import annotations

import statistics
from dataclasses import asdict, replace

from fastsd.errors import InvalidParameter
from fastsd.reference import compare, tolerance_for
from fastsd.schedulers import SCHEDULERS

from .measurement import summarize, timed_call

DEFAULT = "lcm,4,1"
WARMUP = 1  # untimed: the first call without guidance is a new UNet shape (openvino compiles it)


def recipe(value: str) -> dict:
    """--few-step's value ("SCHEDULER,STEPS,GUIDANCE") as the generation settings it names."""
    parts = str(value).split(",")
    allowed = "SCHEDULER,STEPS,GUIDANCE, e.g. lcm,4,1 or tcd,4,1.5 (scheduler one of " + ", ".join(SCHEDULERS) + ")"
    try:
        scheduler, steps, guidance = parts[0].strip(), int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise InvalidParameter("--few-step", value, allowed) from None
    if len(parts) != 3 or scheduler not in SCHEDULERS or steps < 1 or guidance < 0:
        raise InvalidParameter("--few-step", value, allowed)
    return {"scheduler": scheduler, "steps": steps, "guidance": guidance}


def calls(settings) -> int:
    """End-to-end calls per configuration and batch size that --few-step adds (for the progress bar)."""
    return WARMUP + settings.repeat if settings.few_step else 0


def measure(built: list, settings, batch: int, height: int, width: int, device, unet_calls: int, progress,
            log) -> None:
    """Time the few-step generation of every built configuration (repeats interleaved, as the harness does) and
    put it in each entry's batch row as `few_step`; a configuration that fails gets the reason instead (the
    baseline's failure is raised)."""
    few = recipe(settings.few_step)
    s = replace(settings, **few)
    runs = {id(r): ([], [], [], []) for _, _, r in built}  # warm-up, runs, cpu, outputs
    failed = {}
    for i in range(WARMUP + settings.repeat):
        for spec, entry, runner in built:
            if id(runner) in failed:
                continue
            warm, timed, cpu, outs = runs[id(runner)]
            is_warm = i < WARMUP
            progress.step(f"{spec.name} batch {batch}: few-step ({s.scheduler}, {s.steps} steps, guidance "
                          f"{s.guidance:g}) {i + 1}/{WARMUP + settings.repeat}")
            try:
                wall = timed_call(lambda: outs.append(runner.end_to_end(s, batch, height, width)), device,
                                  None if is_warm else cpu)
            except Exception as e:
                if spec.is_baseline:
                    raise
                failed[id(runner)] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e) else ''}"
                log(f"FAILED {spec.name} few-step: {failed[id(runner)]}")
                continue
            (warm if is_warm else timed).append(wall)
            progress.done()
    reference = None
    for spec, entry, runner in built:
        row = entry["batches"][str(batch)]
        if id(runner) in failed:
            row["few_step"] = {**few, "failed": failed[id(runner)]}
            continue
        warm, timed, cpu, outs = runs[id(runner)]
        stats = {**few, **summarize(timed), "warmup_s": warm, "cpu_s": cpu, "cpu_median_s": statistics.median(cpu),
                 "unet_calls": unet_calls}
        stats["per_image_s"] = stats["median_s"] / batch if stats.get("median_s") else None
        default = row["end_to_end"]["median_s"]
        stats["default_per_image_s"] = default / batch if default else None
        stats["vs_default"] = default / stats["median_s"] if default and stats.get("median_s") else None
        images, latents = outs[-1]
        if spec.is_baseline:
            reference = (images, latents)
            stats["parity"] = {"reference": True}
        else:
            tol = tolerance_for(runner.config)
            seeds = [settings.seed + k for k in range(batch)]
            rows = compare(reference[0], images, reference[1], latents, [settings.prompt] * batch, seeds, tol)
            stats["parity"] = {"psnr_db": min(r.psnr_db for r in rows), "max_abs": max(r.max_abs for r in rows),
                               "latent_cosine": min(r.latent_cosine for r in rows),
                               "passed": all(r.passed for r in rows), "tolerance": asdict(tol)}
        row["few_step"] = stats
    base = built[0][1]["batches"][str(batch)].get("few_step", {})
    for spec, entry, runner in built:
        st = entry["batches"][str(batch)]["few_step"]
        if st.get("median_s") and base.get("median_s"):
            st["speedup"] = base["median_s"] / st["median_s"]
