"""gpu_check sections that run the whole engine: SD 1.5 and SD 2.1 with random weights in fp16 through Triton
attention, the fused ops and CUDA graphs together (against diffusers' fp16 and fp32 pipelines on the same
GPU), a LoRA set under fused QKV, and timings against diffusers' fp16 pipeline.

Random weights: the architectures and shapes are real, nothing downloads. They say nothing about fp16
overflow of trained weights; the comparison that counts is the engine against diffusers' own fp16 run of the
same weights (does fastsd lose more than diffusers' fp16 loses against fp32?).
On a CPU (`gpu_check --rehearse`) the sections run the tiny model in fp32, to check the harness itself.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from fastsd import kernels, optimize
from fastsd.loading import build_random, load_model
from fastsd.lora_files import random_factors, save_diffusers_layout
from fastsd.optimize import OptimizeConfig
from fastsd.presets import DEFAULT_MODEL, PRESETS
from fastsd.reference import psnr, to_uint8

from .gpu_sections import _first_line, rehearsal

PROMPT = "a photograph of an astronaut riding a horse"
MIN_PSNR = 30.0  # dB: fastsd's fp16 tolerance against FP32 (fastsd.reference.TOLERANCES)
MARGIN_DB = 3.0  # or no more than this below what diffusers' own fp16 pipeline reaches against FP32


def build(name: str, device: torch.device):
    """The preset's architecture with seeded random weights, made directly on `device` (fp32)."""
    with torch.device(device):
        return build_random(PRESETS[name], seed=0, with_safety_checker=False)


def diffusers_images(model, device, dtype, steps: int, size: int, seed: int = 0):
    """diffusers' own StableDiffusionPipeline over `model`'s modules (moved to device and dtype in place)."""
    pipe = model.to_pipeline(with_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = pipe([PROMPT], negative_prompt=[""], num_inference_steps=steps, guidance_scale=7.5, height=size,
               width=size, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil")
    _sync(device)
    return out.images, time.perf_counter() - t0


def engine_images(engine, steps: int, size: int, seed: int = 0):
    t0 = time.perf_counter()
    result = engine.generate([PROMPT], num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                             seed=[seed], progress=False)
    _sync(engine.backend.device)
    return result.images, time.perf_counter() - t0


def _sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _db(a, b) -> float:
    value = psnr(to_uint8(a)[0], to_uint8(b)[0])
    return round(value, 2) if math.isfinite(value) else float("inf")


def half(model):
    m = copy.deepcopy(model)
    for part in (m.text_encoder, m.unet, m.vae):
        part.half()
    return m


def full_config(s) -> OptimizeConfig:
    """Triton attention, fused ops and CUDA graphs together (fp32 on a CPU rehearsal: graphs log off there)."""
    return OptimizeConfig(device=str(s.device), dtype="fp32" if rehearsal(s) else "fp16", attention="triton",
                          fused_ops=True, cuda_graphs=True, safety_checker=False)


def active(engine) -> tuple[list[str], list[str]]:
    """(what is on, what should be on and is not) of Triton attention, Triton fused ops and CUDA graphs."""
    backend, on, off = engine.backend, [], []
    on.append(f"attention={backend.attention}")
    impls = {getattr(m, "_fastsd_impl", None) for m in backend.unet_module.modules()} - {None}
    on.append(f"fused[{','.join(sorted(impls))}]")
    graphs = getattr(backend, "graphs", None)
    on.append(f"cuda_graphs captures={graphs.captures} replays={graphs.replays}" if graphs else "cuda_graphs off")
    if backend.device.type == "cuda":
        if backend.attention != "triton":
            off.append("triton attention")
        if "triton" not in impls:
            off.append("triton fused ops")
        if graphs is None or graphs.replays == 0:
            off.append("CUDA graph replays")
    return on, off


def engine(s) -> None:
    cases = [("tiny", 64)] if rehearsal(s) else [("sd-1.5", 512), ("sd-2.1", 768)]
    steps = 2 if rehearsal(s) else 4 if s.quick else 12
    for name, size in cases:
        what = f"{name} {size}x{size} {steps} steps: triton + fused ops + CUDA graphs"
        if not s.enough(25, what):
            return
        row = {"what": what}
        try:
            model = build(name, s.device)
            ref32, t32 = diffusers_images(model, s.device, torch.float32, steps, size)
            m16 = half(model) if not rehearsal(s) else copy.deepcopy(model)
            ref16, t16 = diffusers_images(m16, s.device, torch.float16 if not rehearsal(s) else torch.float32,
                                          steps, size)
            del m16
            eng = optimize(model, full_config(s))
            got, t_first = engine_images(eng, steps, size)  # compiles, autotunes and captures
            got2, t_again = engine_images(eng, steps, size)  # replays
            on, off = active(eng)
            e32, d32, e16 = _db(got, ref32), _db(ref16, ref32), _db(got, ref16)
            close = e32 >= MIN_PSNR or e32 >= d32 - MARGIN_DB
            row.update(psnr_engine_vs_fp32=e32, psnr_diffusers_fp16_vs_fp32=d32, psnr_engine_vs_diffusers_fp16=e16,
                       repeat_identical=_db(got, got2) == float("inf"), active=", ".join(on),
                       seconds_first=round(t_first, 2), seconds_again=round(t_again, 2),
                       seconds_diffusers_fp16=round(t16, 2), seconds_diffusers_fp32=round(t32, 2),
                       passed=close and not off)
            if off:
                row["error"] = "not active: " + ", ".join(off)
            elif not close:
                row["error"] = f"{e32} dB against FP32, diffusers' fp16 reaches {d32} dB"
            del eng, model
        except Exception as exc:  # NonFiniteOutput (the NaN guard) included
            row.update(passed=False, error=_first_line(exc))
        s.row(**row)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


def lora(s) -> None:
    """A LoRA set under fused QKV (on by default on CUDA) gives what it gives without fused ops, and changes
    the output; switching back to none gives the base output again."""
    dtype = "fp32" if rehearsal(s) else "fp16"
    name = "tiny" if rehearsal(s) else DEFAULT_MODEL
    steps = 4

    def fresh():
        return load_model(name, random_weights=name == "tiny")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_diffusers_layout(random_factors(fresh(), rank=4, seed=1, text_targets=(), std=0.3),
                                     Path(tmp) / "attn.safetensors")
        plain = optimize(fresh(), OptimizeConfig(device=str(s.device), dtype=dtype, fused_ops=False,
                                                 safety_checker=False))
        fused = optimize(fresh(), OptimizeConfig(device=str(s.device), dtype=dtype, fused_ops=True,
                                                 safety_checker=False))
        if rehearsal(s):  # fuse_qkv is CUDA-only in apply_fused_ops: forced for the rehearsal
            kernels.fuse_projections(fused.backend.unet_module)
        applied = fused.describe()["applied"]
        row = {"what": f"{name} LoRA (to_q/k/v/out, rank 4) under fused QKV, {dtype}", "applied": applied}
        try:
            size = plain.model.native_size
            base, _ = engine_images(fused, steps, size)
            plain.set_loras([(path, 1.0)])
            fused.set_loras([(path, 1.0)])
            want, _ = engine_images(plain, steps, size)
            got, _ = engine_images(fused, steps, size)
            fused.set_loras([])
            back, _ = engine_images(fused, steps, size)
            same, changed, restored = _db(got, want), _db(got, base), _db(back, base)
            fused_on = "fuse_qkv" in applied or rehearsal(s)
            row.update(psnr_fused_vs_plain=same, psnr_lora_vs_base=changed, psnr_none_vs_base=restored,
                       passed=fused_on and same >= MIN_PSNR and changed < same - 6 and restored >= 40)
            if not fused_on:
                row["error"] = "fuse_qkv was not applied"
            elif changed >= same - 6:
                row["error"] = "the LoRA set did not change the output under fused QKV"
        except Exception as exc:
            row.update(passed=False, error=_first_line(exc))
        s.row(**row)


def timings(s) -> None:
    """Seconds per image: diffusers' fp16 pipeline (SDPA) and fastsd configurations of the same weights."""
    name, size = ("tiny", 64) if rehearsal(s) else ("sd-1.5", 512)
    steps = 2 if rehearsal(s) else 10 if s.quick else 25
    dtype = torch.float32 if rehearsal(s) else torch.float16
    fp = "fp32" if rehearsal(s) else "fp16"
    if not s.enough(20, "timings"):
        return
    model = build(name, s.device)
    m16 = copy.deepcopy(model) if rehearsal(s) else half(model)
    diffusers_images(m16, s.device, dtype, 2, size)  # warm-up
    _, base = diffusers_images(m16, s.device, dtype, steps, size)
    del m16
    s.row(what=f"diffusers {fp} (SDPA)", model=name, size=size, steps=steps, seconds=round(base, 3),
          steps_per_s=round(steps / base, 2))
    configs = {f"fastsd {fp} sdpa": OptimizeConfig(device=str(s.device), dtype=fp, attention="sdpa",
                                                    safety_checker=False),
               f"fastsd {fp} triton + fused ops + CUDA graphs": full_config(s),
               "fastsd profile fast": OptimizeConfig.from_profile("fast", device=str(s.device), safety_checker=False)}
    if rehearsal(s):  # the CPU's `fast` is another backend or dtype: nothing the harness needs to see
        configs.pop("fastsd profile fast")
    for label, config in configs.items():
        if not s.enough(15, label):
            return
        try:
            eng = optimize(copy.deepcopy(model), config)
            engine_images(eng, 2, size)  # warm-up: compile, autotune, capture
            _, t = engine_images(eng, steps, size)
            s.row(what=label, model=name, size=size, steps=steps, seconds=round(t, 3),
                  steps_per_s=round(steps / t, 2), ratio_to_diffusers=round(t / base, 3),
                  applied=", ".join(eng.describe()["applied"]))
            del eng
        except Exception as exc:
            s.row(what=label, passed=False, error=_first_line(exc))
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    s.note(seconds_are="wall time of one image with guidance, after a warm-up run; ratio < 1 is faster")
