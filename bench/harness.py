"""The measurements behind `fastsd bench`.

One process, one model, the same inputs for every configuration: the diffusers StableDiffusionPipeline
(FP32, the baseline and the parity reference) runs first, then each fastsd configuration on a fresh copy
of the same modules. Per batch size it times each component (text encoder, one UNet step, VAE decode,
safety checker) and the whole generation, keeps the warm-up calls apart, and compares each
configuration's final images with the baseline's (fastsd.reference.compare)."""
from __future__ import annotations

import copy
import gc
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from fastsd import validation as check
from fastsd.errors import InvalidParameter, ModelLoadError
from fastsd.loading import load_model
from fastsd.reference import compare, tolerance_for

from . import fewstep
from .inputs import make_inputs, task_inputs, unet_calls, vae_encodes
from .machine import machine_info, versions
from .measurement import PeakMemory, summarize, timed_call
from .peer import PEERS, PeerRunner
from .runners import (AccelerateRunner, CannotRunHere, DiffusersRunner, EngineRunner, component_call, first_line,
                      onnx_engine_model)
from .settings import BASELINE, LABELS, PIPELINES, BenchSettings, ConfigSpec, components_for, dropin_runner


def _unsupported_here(e: BaseException, spec) -> bool:
    """An error that says this machine or backend cannot run the configuration at all (no such device, a
    dtype the backend has no kernels for, a package missing), as opposed to one that broke."""
    if isinstance(e, InvalidParameter) and getattr(e, "name", None) in ("device", "dtype"):
        return True
    return isinstance(e, ModelLoadError) and "not installed" in str(e)


# a whole run this far from the sum of its parts means one of the figures is not to be trusted
CONSISTENCY_RANGE = (0.67, 1.5)


def consistency(row: dict, unet_calls: int, text_in_e2e: bool, vae_encodes: int = 0) -> dict:
    """The measured end-to-end median against the sum of the component medians for the same run (text
    encoder only where the end-to-end run encodes every time: the engine caches prompt embeddings)."""
    c = row["components"]
    parts = [c[k].get("median_s") or 0.0 for k in (("text_encoder",) if text_in_e2e else ()) + ("vae_decode", "safety_checker")]
    expected = sum(parts) + unet_calls * c["unet_step"]["median_s"]
    if vae_encodes:
        expected += vae_encodes * c["vae_encode"]["median_s"]
    ratio = row["end_to_end"]["median_s"] / expected if expected else None
    ok = ratio is not None and CONSISTENCY_RANGE[0] <= ratio <= CONSISTENCY_RANGE[1]
    note = (f"end to end {row['end_to_end']['median_s']:.2f} s vs {expected:.2f} s from its components "
            f"(ratio {ratio:.2f}): " + ("consistent" if ok else "the component and whole-run figures disagree "
                                        "(load from other processes?); do not trust this row's ratios"))
    return {"expected_s": expected, "ratio": ratio, "ok": ok, "note": note}


def _dropin_ratios(results: list) -> None:
    """Beside each drop-in (accelerate) configuration: its ratio to fastsd's engine on the same backend
    (torch for "accelerate", openvino for "accelerate-openvino") with the same dtype and flags, measured in
    the same run (engine median / drop-in median; below 1: the drop-in is slower)."""
    engines = {(e["backend"], e["dtype"], tuple(sorted(e["flags"].items()))): e for e in results
               if not e["baseline"] and dropin_runner(e["backend"]) is None}
    for entry in results:
        runner = dropin_runner(entry["backend"])
        eng = engines.get((runner, entry["dtype"], tuple(sorted(entry["flags"].items()))))
        if runner is None or eng is None:
            continue
        entry["vs_engine"] = {"engine": eng["name"], "batches": {}}
        for b, row in entry["batches"].items():
            erow = eng["batches"].get(b)
            if erow is None:
                continue
            pairs = [(comp, erow["components"][comp], st) for comp, st in row["components"].items()] + \
                [("end_to_end", erow["end_to_end"], row["end_to_end"])]
            entry["vs_engine"]["batches"][b] = {comp: es["median_s"] / st["median_s"] for comp, es, st in pairs
                                                if es.get("median_s") and st.get("median_s")}


# -- the run -----------------------------------------------------------------------------------------
def _finite(x):
    """JSON has no inf: PSNR of identical images is written as the string "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class _Progress:
    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, disable=not enabled, unit="call", file=sys.stderr, leave=False,
                        dynamic_ncols=True)

    def step(self, what: str):
        self.bar.set_description_str(what, refresh=True)

    def done(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def run_bench(settings: BenchSettings, model=None, log=print) -> dict:
    """Measure every configuration in `settings.configs` (baseline first) and return the report dict
    (what --json writes). `model` is an SDModel; loaded from `settings.model` when None. `log` gets the
    one-line notes (skipped configurations)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    started = time.time()
    load_avg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    given = model
    mem = PeakMemory(device)
    base_memory = mem.current()  # the process before any model is loaded

    def fresh_model():
        """A pristine copy for the next configuration (optimize changes modules in place). Loaded again
        rather than deep-copied from one kept in memory: one full-size model resident at a time (random
        weights are seeded, so every load is the same model)."""
        if given is not None:
            return copy.deepcopy(given)
        return load_model(settings.model, random_weights=settings.random_weights, allow_pickle=settings.allow_pickle,
                          config=settings.model_config, safety_checker=settings.safety_checker,
                          vae_tiny=settings.vae_tiny)
    model = fresh_model()
    load_s = time.perf_counter() - t0
    model_info = {"name": model.name, "spec": settings.model, "source": model.source,
                  "random_weights": model.source == "random",
                  "parameters": {k: int(v) for k, v in model.parameter_counts().items()}, "load_s": load_s,
                  "unet_in_channels": int(model.unet.config.in_channels)}
    model_has_safety = model.safety_checker is not None
    height = check.size("height", settings.height or model.native_size)
    width = check.size("width", settings.width or model.native_size)
    settings = replace(settings, task_inputs=task_inputs(model, settings.task, settings.strength, height, width))
    strength = settings.task_inputs.get("strength")
    n_calls, sched_name, _ = unet_calls(model, settings.steps, settings.scheduler, settings.task, strength)
    est_calls, _, _ = unet_calls(model, settings.estimate_steps, settings.scheduler, settings.task, strength)
    few = fewstep.recipe(settings.few_step) if settings.few_step else None
    few_calls = unet_calls(model, few["steps"], few["scheduler"], settings.task, strength)[0] if settings.few_step else 0
    has_safety = settings.safety_checker and model.safety_checker is not None
    all_comps = components_for(settings.task)
    nine = model.unet.config.in_channels == 9
    encodes = {base: vae_encodes(settings.task, nine, strength, base) for base in (True, False)}

    configs = list(settings.configs)
    if not configs or not configs[0].is_baseline:
        configs = [ConfigSpec(BASELINE)] + [c for c in configs if not c.is_baseline]
    skipped, failed, onnx_models = [], [], {}
    reference = {}  # batch -> (images, latents) of the baseline's end-to-end run
    results = []

    def cannot_run(spec, reason):
        skipped.append({"config": spec.name, "reason": reason})
        log(f"skipped {spec.name}: {reason}")

    def fail(spec, e, when):
        reason = f"failed {when}: {type(e).__name__}: {first_line(e)}"
        failed.append({"config": spec.name, "reason": reason})
        log(f"FAILED {spec.name}: {reason}")

    comps = [c for c in all_comps if c != "safety_checker" or has_safety]
    per_batch = len(comps) * (settings.warmup + settings.repeat) + settings.e2e_warmup + settings.repeat + \
        fewstep.calls(settings)
    progress = _Progress(len(configs) * (1 + len(settings.batches) * per_batch), settings.progress)
    inputs, shapes = {}, {}
    for b in settings.batches:
        inputs[b], shapes[str(b)] = make_inputs(model, settings, b, height, width, device)

    # 1. build every configuration (each on its own copy of the model), so that their repeats can be
    # interleaved: load from other processes then hits every configuration alike
    built = []  # (spec, entry, runner)
    for spec in configs:
        gc.collect()
        entry = {"name": spec.name, "backend": spec.backend, "dtype": spec.dtype, "flags": dict(spec.flags),
                 "profile": spec.profile, "baseline": spec.is_baseline, "batches": {}}
        progress.step(f"{spec.name}: loading and building")
        before = mem.current()
        try:
            if spec.backend in ("onnxruntime", "openvino"):
                export_dtype = spec.dtype if spec.backend == "onnxruntime" else "fp32"  # openvino picks its own
                if export_dtype not in onnx_models:
                    onnx_models[export_dtype] = onnx_engine_model(model if model is not None else fresh_model(),
                                                                  settings, export_dtype, height, width, spec.backend)
                    entry["export_s"] = onnx_models[export_dtype][1]
                t0 = time.perf_counter()
                runner = EngineRunner(onnx_models[export_dtype][0], spec, settings)
            elif spec.backend in PEERS:  # what a user runs instead of fastsd (bench/peer.py)
                t0 = time.perf_counter()
                given_model, model = model, None
                runner = PeerRunner(lambda: given_model if given_model is not None else fresh_model(), settings,
                                    settings.peer_python, height, width, log)
                del given_model
                entry["export_s"] = runner.export["seconds"]
                gc.collect()
            else:
                if model is None:
                    t0 = time.perf_counter()
                    model = fresh_model()
                    entry["load_s"] = time.perf_counter() - t0
                    before = mem.current()
                t0 = time.perf_counter()
                m, model = model, None  # the runner owns it now
                if dropin_runner(spec.backend):
                    # a drop-in over graphs runs the export this run made for that backend's engine, if any,
                    # rather than exporting the same model again (minutes at SD size)
                    made = onnx_models.get(spec.dtype if dropin_runner(spec.backend) == "onnxruntime" else "fp32")
                    runner = AccelerateRunner(m, spec, settings, onnx_dir=made[0].path if made else None)
                else:
                    runner = DiffusersRunner(m, settings) if spec.is_baseline else EngineRunner(m, spec, settings)
                del m
            entry["build_s"] = time.perf_counter() - t0
        except CannotRunHere as e:
            cannot_run(spec, str(e))
            progress.done(1 + len(settings.batches) * per_batch)
            continue
        except Exception as e:
            if spec.is_baseline:
                raise
            if _unsupported_here(e, spec):
                cannot_run(spec, f"{type(e).__name__}: {first_line(e)}")
            else:
                fail(spec, e, "to build")
            progress.done(1 + len(settings.batches) * per_batch)
            continue
        progress.done()
        entry["describe"] = runner.describe()
        entry["memory_after_build_mb"] = mem.current() / 2**20
        entry["resident_mb"] = (mem.current() - before) / 2**20
        entry["load_average"] = {"built": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        built.append((spec, entry, runner))
    mem.start()

    # 2. per batch: warm-ups, then every repeat of a component across all configurations in turn
    for b in settings.batches:
        x = inputs[b]
        for spec, entry, runner in built:
            entry["batches"][str(b)] = {"components": {}}
        for comp in all_comps:
            for spec, entry, runner in list(built):
                row = entry["batches"][str(b)]
                if comp not in comps or (comp == "safety_checker" and not runner.has_safety_checker):
                    row["components"][comp] = {"skipped": "the model has no safety checker"
                                               if not model_has_safety else "this configuration runs no safety checker"}
            active = [t for t in built if "skipped" not in t[1]["batches"][str(b)]["components"].get(comp, {})]
            timings = {id(r): ([], [], []) for _, _, r in active}  # warm-up, runs, cpu
            for i in range(settings.warmup + settings.repeat):
                for spec, entry, runner in list(active):
                    warm, runs, cpu = timings[id(runner)]
                    is_warm = i < settings.warmup
                    progress.step(f"{spec.name} batch {b}: {LABELS[comp]} "
                                  + (f"warm-up {i + 1}/{settings.warmup}" if is_warm else
                                     f"{i - settings.warmup + 1}/{settings.repeat}"))
                    call = component_call(runner, comp, x)
                    per = runner.unet_calls_per_timing if comp == "unet_step" else 1
                    try:
                        c = []
                        wall = timed_call(call, device, c) / per
                    except Exception as e:
                        if spec.is_baseline:
                            raise
                        fail(spec, e, f"while measuring {LABELS[comp]}")
                        active.remove((spec, entry, runner))
                        built.remove((spec, entry, runner))
                        progress.done((settings.warmup + settings.repeat - i) * 1)
                        continue
                    (warm if is_warm else runs).append(wall)
                    if not is_warm:
                        cpu.append(c[0] / per)
                    progress.done()
            for spec, entry, runner in active:
                warm, runs, cpu = timings[id(runner)]
                entry["batches"][str(b)]["components"][comp] = {
                    **summarize(runs), "warmup_s": warm, "cpu_s": cpu, "cpu_median_s": statistics.median(cpu)}
        # end to end, interleaved the same way
        e2e = {id(r): ([], [], [], []) for _, _, r in built}  # warm-up, runs, cpu, outputs
        for i in range(settings.e2e_warmup + settings.repeat):
            for spec, entry, runner in list(built):
                warm, runs, cpu, outs = e2e[id(runner)]
                is_warm = i < settings.e2e_warmup
                progress.step(f"{spec.name} batch {b}: end to end ({settings.steps} steps) "
                              f"{i + 1}/{settings.e2e_warmup + settings.repeat}")
                try:
                    wall = timed_call(lambda: outs.append(runner.end_to_end(settings, b, height, width)), device,
                                  None if is_warm else cpu)
                except Exception as e:
                    if spec.is_baseline:
                        raise
                    fail(spec, e, "while measuring end to end")
                    built.remove((spec, entry, runner))
                    continue
                (warm if is_warm else runs).append(wall)
                progress.done()
        for spec, entry, runner in built:
            warm, runs, cpu, outs = e2e[id(runner)]
            row = entry["batches"][str(b)]
            row["end_to_end"] = {**summarize(runs), "warmup_s": warm, "steps": settings.steps,
                                 "unet_calls": n_calls, "cpu_s": cpu, "cpu_median_s": statistics.median(cpu)}
            med = row["end_to_end"]["median_s"]
            row["images_per_s"] = b / med if med else None
            if hasattr(runner, "own_metrics"):  # the peer's pipeline times itself too
                row["own_metrics"] = runner.own_metrics()
            c = row["components"]
            parts = [c[k].get("median_s") or 0.0 for k in ("text_encoder", "vae_decode", "safety_checker")]
            n_enc = encodes[spec.is_baseline]
            if n_enc:
                parts.append(n_enc * c["vae_encode"]["median_s"])
            row["end_to_end_estimate"] = {
                "steps": settings.estimate_steps, "unet_calls": est_calls, "vae_encodes": n_enc,
                "seconds": sum(parts) + est_calls * c["unet_step"]["median_s"],
                "how": "text encoder + vae_encodes x VAE encode + unet_calls x UNet step + VAE decode + safety "
                       "checker (medians)" if n_enc else
                       "text encoder + unet_calls x UNet step + VAE decode + safety checker (medians)"}
            row["consistency"] = consistency(row, n_calls, text_in_e2e=spec.is_baseline, vae_encodes=n_enc)
            if not row["consistency"]["ok"]:
                log(f"WARNING {spec.name} batch {b}: {row['consistency']['note']}")
            images, latents = outs[-1]
            if spec.is_baseline:
                reference[b] = (images, latents)
                row["parity"] = {"reference": True}
            else:
                ref_images, ref_latents = reference[b]
                tol = tolerance_for(runner.config)  # the configuration verify would hold it to
                seeds = [settings.seed + i for i in range(b)]
                rows = compare(ref_images, images, ref_latents, latents, [settings.prompt] * b, seeds, tol)
                row["parity"] = {"psnr_db": min(r.psnr_db for r in rows),
                                 "latent_cosine": min(r.latent_cosine for r in rows),
                                 "max_abs": max(r.max_abs for r in rows),
                                 "passed": all(r.passed for r in rows), "tolerance": asdict(tol),
                                 "images": [asdict(r) for r in rows]}
        if settings.few_step:  # the same configurations at the few-step recipe, beside this run's generation
            fewstep.measure(built, settings, b, height, width, device, few_calls, progress, log)
    peak = mem.stop()
    for spec, entry, runner in built:
        entry["peak_memory"] = {"kind": "cuda" if device.type == "cuda" else "cpu", "method": mem.method,
                                "peak_mb": peak / 2**20, "resident_mb": entry["resident_mb"],
                                "process_without_model_mb": base_memory / 2**20,
                                "config_peak_mb": entry["resident_mb"]}
        entry["load_average"]["done"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        results.append(entry)
    del built
    gc.collect()
    for onnx_model, _ in onnx_models.values():
        if onnx_model.extra.get("bench_temp"):
            shutil.rmtree(onnx_model.extra["bench_temp"], ignore_errors=True)
    progress.close()

    base = results[0]
    for entry in results:
        for b, row in entry["batches"].items():
            brow = base["batches"][b]
            for stats, bs in [(st, brow["components"][comp]) for comp, st in row["components"].items()] + \
                    [(row["end_to_end"], brow["end_to_end"])]:
                if stats.get("median_s") and bs.get("median_s"):
                    stats["speedup"] = bs["median_s"] / stats["median_s"]
                    stats["cpu_speedup"] = bs["cpu_median_s"] / stats["cpu_median_s"]
            row["end_to_end_estimate"]["speedup"] = (brow["end_to_end_estimate"]["seconds"]
                                                     / row["end_to_end_estimate"]["seconds"])
    _dropin_ratios(results)
    machine = machine_info(device)
    machine["load_average_start"], machine["load_average_end"] = load_avg_start, machine.pop("load_average")
    return _finite({
        "fastsd_bench": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "model": model_info,
        "settings": {"height": height, "width": width, "steps": settings.steps, "unet_calls": n_calls,
                     "scheduler": sched_name, "guidance": settings.guidance, "batches": list(settings.batches),
                     "repeat": settings.repeat, "warmup": settings.warmup, "e2e_warmup": settings.e2e_warmup,
                     "seed": settings.seed, "prompt": settings.prompt, "negative": settings.negative,
                     "estimate_steps": settings.estimate_steps, "estimate_unet_calls": est_calls,
                     "device": settings.device, "attention": settings.attention,
                     "safety_checker": has_safety, "task": settings.task, "strength": strength,
                     "pipeline": PIPELINES[settings.task], "components": list(all_comps),
                     "mask": "top-left quarter" if settings.task == "inpaint" else None,
                     "unet_in_channels": model_info["unet_in_channels"],
                     "few_step": {**few, "unet_calls": few_calls} if settings.few_step else None},
        "machine": machine,
        "versions": versions(),
        "shapes": shapes,
        "skipped": skipped,
        "failed": failed,
        "configs": results,
        "notes": ["speedup = baseline median / configuration median (above 1 is faster than diffusers)",
                  "parity: the configuration's final images against the baseline's (FP32 diffusers, same "
                  "prompt and seeds), fastsd.reference.compare at the configuration dtype's tolerance",
                  "end-to-end runs follow the component warm-ups (same shapes); e2e_warmup more are excluded",
                  "peak memory: peak_mb = peak RSS of the process during the configuration's runs (one model "
                  "resident at a time), or CUDA max_memory_allocated on a GPU; config_peak_mb = peak_mb minus "
                  "the process's RSS before any model was loaded (on the CPU)",
                  "end to end: the fastsd engine caches prompt embeddings, so its repeated runs skip the text "
                  "encoder (about 0.2 s for SD 1.x on this CPU); the diffusers pipeline encodes every time",
                  "cpu_s: process CPU seconds per call, all threads together; on a shared machine wall time "
                  "grows with other load, CPU time much less (cpu_speedup compares those)"],
    })
