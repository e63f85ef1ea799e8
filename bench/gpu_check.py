"""One-command self-check of fastsd's GPU paths on a machine with an NVIDIA GPU.

    python -m fastsd.bench.gpu_check [--out out/gpu_check] [--device cuda:0] [--budget-s 540] [--quick]

Sections (each one's failure is recorded and the next runs; each is skipped, with the reason, when what
it needs is missing or the time budget is spent):
  1. attention: sdpa, xformers and triton at SD 1.5 / 2.1 shapes in fp16 (and bf16 where the GPU has it):
     max abs error against the FP32 `math` reference and median ms; calls a backend cannot take (a mask,
     a head dim with no fitting Triton config) are listed with the reason;
  2. fused ops: the Triton GroupNorm+SiLU and GEGLU kernels against torch (max abs, ms for both);
  3. CUDA graphs: the tiny UNet captured and replayed for two batch sizes on each visible GPU (cuda:N runs
     under a device guard), each replay checked against an eager call on new inputs (an empty graph would
     return stale outputs);
  4. SD 2.1 at 768x768 in fp16 through the engine's NaN guard (the model from the Hugging Face cache, else
     its architecture with random weights, which says nothing about fp16 overflow of the real weights);
  5. ONNX Runtime: the embedded model (fastsd-shapes) exported, then run with the CUDA provider and with
     TensorRT, each against the PyTorch FP32 reference (`fastsd verify`'s comparison).
It writes gpu_check.json and gpu_check.md to --out and prints what it skipped and why. On a machine
without a CUDA device it says so and exits 0 (nothing to check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fastsd import optimize
from fastsd.engine import NonFiniteOutput
from fastsd.kernels import (CUDAGraphRunner, backend_status, fused_op_available, geglu, get_backend,
                            groupnorm_silu)
from fastsd.loading import load_model
from fastsd.optimize import OptimizeConfig
from fastsd.presets import DEFAULT_MODEL
from fastsd.verify import verify

from .kernels import (GEGLU_SHAPES, GN_SHAPES, QUICK_GEGLU, QUICK_GN, _math_chunked, _version, attention_cases,
                      time_ms)

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# max abs error against the FP32 reference at unit-variance inputs (fastsd.reference uses the same scale)
ATTENTION_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
FUSED_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def cuda_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return False, f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"
    return True, ""


def environment(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
           "shared_memory_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
           "device_count": torch.cuda.device_count()}
    for pkg in ("triton", "xformers", "diffusers", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        env[pkg] = _version(pkg)
    return env


# -- 1. attention ---------------------------------------------------------------------------------
def check_attention(device, dtypes, quick: bool, budget: Budget, skipped: list) -> list[dict]:
    rows = []
    for dtype in dtypes:
        status = backend_status(device, dtype)
        for name in ("xformers", "triton"):
            if not status[name][0]:
                skipped.append(f"attention {name} {DTYPE_NAMES[dtype]}: {status[name][1]}")
        for model, label, kind, b, h, m, n, d in attention_cases(quick):
            if budget.left() < 30:
                skipped.append(f"attention {model} {label} {kind} {DTYPE_NAMES[dtype]}: time budget spent")
                continue
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(b, h, m, d, generator=g).to(device, dtype)
            k = torch.randn(b, h, n, d, generator=g).to(device, dtype)
            v = torch.randn(b, h, n, d, generator=g).to(device, dtype)
            scale = d ** -0.5
            ref = _math_chunked(q.float(), k.float(), v.float(), scale)
            for name in ("sdpa", "xformers", "triton"):
                backend = get_backend(name)
                row = {"model": model, "level": label, "kind": kind, "shape": [b, h, m, n, d],
                       "dtype": DTYPE_NAMES[dtype], "backend": name}
                if not status[name][0]:
                    continue
                ok, why = backend.supports(q, k, v, None)
                if not ok:
                    row["skipped"] = why  # the processor uses sdpa for such calls
                    rows.append(row)
                    continue
                try:
                    def call():
                        return backend.fn(q, k, v, scale=scale, attn_mask=None, upcast=True)
                    out = call()  # the first call compiles and autotunes (triton): not timed
                    err = (out.float() - ref).abs().max().item()
                    row.update(max_abs=err, tolerance=ATTENTION_TOL[dtype], passed=err <= ATTENTION_TOL[dtype],
                               ms=round(time_ms(call, device, repeat=10 if not quick else 3), 4))
                except Exception as exc:
                    row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                rows.append(row)
            del q, k, v, ref
    return rows


# -- 2. fused ops ---------------------------------------------------------------------------------
def check_fused(device, dtypes, quick: bool, budget: Budget, skipped: list) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for op, shapes in (("groupnorm_silu", QUICK_GN if quick else GN_SHAPES),
                           ("geglu", QUICK_GEGLU if quick else GEGLU_SHAPES)):
            ok, why = fused_op_available(op, device, dtype)
            if not ok:
                skipped.append(f"fused {op} {DTYPE_NAMES[dtype]}: {why}")
                continue
            for shape in shapes:
                if budget.left() < 30:
                    skipped.append(f"fused {op} {shape} {DTYPE_NAMES[dtype]}: time budget spent")
                    continue
                g = torch.Generator(device="cpu").manual_seed(1)
                x = torch.randn(*shape, generator=g).to(device, dtype)
                row = {"op": op, "shape": list(shape), "dtype": DTYPE_NAMES[dtype]}
                try:
                    if op == "groupnorm_silu":
                        w = torch.randn(shape[1], generator=g).to(device, dtype)
                        b = torch.randn(shape[1], generator=g).to(device, dtype)
                        ref = groupnorm_silu(x.float(), 32, w.float(), b.float(), impl="torch")

                        def run(impl):
                            return lambda: groupnorm_silu(x, 32, w, b, impl=impl)
                    else:
                        ref = geglu(x.float(), impl="torch")

                        def run(impl):
                            return lambda: geglu(x, impl=impl)
                    err = (run("triton")().float() - ref).abs().max().item()
                    row.update(max_abs=err, tolerance=FUSED_TOL[dtype], passed=err <= FUSED_TOL[dtype],
                               triton_ms=round(time_ms(run("triton"), device, 10), 4),
                               torch_ms=round(time_ms(run("torch"), device, 10), 4))
                    row["ratio_triton_to_torch"] = round(row["triton_ms"] / row["torch_ms"], 3)
                except Exception as exc:
                    row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                rows.append(row)
    return rows


# -- 3. CUDA graphs -------------------------------------------------------------------------------
def check_cuda_graphs(devices, budget: Budget, skipped: list) -> list[dict]:
    rows = []
    for device in devices:
        if budget.left() < 60:
            skipped.append(f"cuda graphs on {device}: time budget spent")
            continue
        unet = load_model("tiny", random_weights=True).unet.to(device, torch.float16).eval()
        runner = CUDAGraphRunner(unet, max_graphs=4, device=device)
        dim = unet.config.cross_attention_dim
        size = unet.config.sample_size
        for batch in (1, 2):
            row = {"device": str(device), "batch": batch}
            try:
                g = torch.Generator(device="cpu").manual_seed(batch)
                for call in range(3):  # capture on the first call, replays after: each on new inputs
                    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, torch.float16)
                    ehs = torch.randn(batch, 77, dim, generator=g).to(device, torch.float16)
                    t = torch.tensor(10.0 * (call + 1), device=device)
                    with torch.no_grad():
                        eager = unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
                    got = runner(sample, t, ehs)
                    err = (got.float() - eager.float()).abs().max().item()
                    row[f"max_abs_call{call}"] = err
                row["passed"] = all(row[f"max_abs_call{c}"] <= 1e-2 for c in range(3))
                row.update(captures=runner.captures, replays=runner.replays)
            except Exception as exc:
                row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            rows.append(row)
        del runner, unet
        torch.cuda.empty_cache()
    return rows


# -- 4. SD 2.1 at 768 in fp16 ---------------------------------------------------------------------
def check_sd21_fp16(device, budget: Budget, skipped: list, steps: int = 4) -> list[dict]:
    if budget.left() < 120:
        skipped.append("SD 2.1 768 fp16: time budget spent")
        return []
    row = {"model": "sd-2.1", "size": 768, "dtype": "fp16", "steps": steps}
    try:
        try:
            model = load_model("sd-2.1", safety_checker=False)
            row["weights"] = "stabilityai/stable-diffusion-2-1"
        except Exception as exc:
            model = load_model("sd-2.1", random_weights=True, safety_checker=False)
            row["weights"] = f"random (the real weights could not load: {str(exc).splitlines()[0][:120]})"
            skipped.append("SD 2.1 real weights: not in the Hugging Face cache; ran random weights (fp16 overflow of "
                           "the real weights is not exercised)")
        engine = optimize(model, device=str(device), dtype="fp16", attention="auto", safety_checker=False)
        t0 = time.perf_counter()
        result = engine.generate("a photograph of an astronaut riding a horse", num_inference_steps=steps,
                                 height=768, width=768, seed=0, progress=False, output_type="np")
        row.update(seconds=round(time.perf_counter() - t0, 2), passed=True, engine=engine.describe())
        del result, engine, model
    except NonFiniteOutput as exc:
        row.update(passed=False, error=f"NaN guard: {exc}")
    except Exception as exc:
        row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    torch.cuda.empty_cache()
    return [row]


# -- 5. ONNX Runtime CUDA and TensorRT providers ----------------------------------------------------
def check_onnxruntime(device, budget: Budget, skipped: list) -> list[dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        skipped.append("onnxruntime: not installed (pip install onnxruntime-gpu)")
        return []
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
    for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if p not in available:
            skipped.append(f"onnxruntime {p}: not in this onnxruntime build ({ort.__version__}: {', '.join(available)})")
    if not wanted or budget.left() < 120:
        if wanted:
            skipped.append("onnxruntime: time budget spent")
        return []
    # here, not at the top: export_model imports the optional onnx package
    from fastsd.export import export_model, load_onnx_model, reference_model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        export_model(load_model(DEFAULT_MODEL), out, components="text_encoder,unet,vae_decoder", progress=False,
                     echo=None)
        for provider in wanted:
            row = {"model": DEFAULT_MODEL, "provider": provider}
            chain = [provider] + (["CUDAExecutionProvider"] if provider != "CUDAExecutionProvider" else []) \
                + ["CPUExecutionProvider"]
            old = os.environ.get("FASTSD_ORT_PROVIDERS")
            os.environ["FASTSD_ORT_PROVIDERS"] = ",".join(chain)
            try:
                onnx_model = load_onnx_model(out)
                ref = reference_model(onnx_model, safety_checker=False)
                t0 = time.perf_counter()
                report, engine, _, _ = verify(ref, OptimizeConfig(backend="onnxruntime", device=str(device),
                                                                  safety_checker=False),
                                              prompts=["a red circle"], steps=8, engine_model=onnx_model)
                got = engine.describe()["providers"]
                row.update(passed=bool(report["passed"]) and all(v[0] == provider for v in got.values()),
                           providers=got, images=report.get("images"), seconds=round(time.perf_counter() - t0, 2))
                if not all(v[0] == provider for v in got.values()):
                    row["error"] = f"sessions did not get {provider}: {got}"
            except Exception as exc:
                row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            finally:
                if old is None:
                    os.environ.pop("FASTSD_ORT_PROVIDERS", None)
                else:
                    os.environ["FASTSD_ORT_PROVIDERS"] = old
            rows.append(row)
    return rows


# -- report ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = ["# fastsd gpu_check", "", "```", json.dumps(report["environment"], indent=1), "```", ""]
    for section, rows in report["sections"].items():
        lines += [f"## {section}", ""]
        if isinstance(rows, str):
            lines += [rows, ""]
            continue
        if not rows:
            lines += ["(nothing ran)", ""]
            continue
        keys = sorted({k for r in rows for k in r if not isinstance(r[k], (dict, list)) or k == "shape"})
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |")
        lines.append("")
    lines += ["## skipped", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda:0", help="the GPU for the single-device sections (default cuda:0)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new checks after this many seconds")
    p.add_argument("--quick", action="store_true", help="fewer shapes (about a minute of GPU time)")
    args = p.parse_args(argv)

    ok, why = cuda_status()
    if not ok:
        print(f"gpu_check: {why}; nothing to check here. Run it on a machine with an NVIDIA GPU.")
        return 0
    device = torch.device(args.device)
    if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
        print(f"gpu_check: --device must be cuda or cuda:N with N < {torch.cuda.device_count()}, not {args.device}",
              file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    skipped: list[str] = []
    dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    devices = [torch.device(f"cuda:{i}") for i in range(min(2, torch.cuda.device_count()))]
    if len(devices) == 1:
        skipped.append("cuda graphs on cuda:1: one GPU visible (the device guard of cuda:N is not exercised)")
    report = {"environment": environment(device), "sections": {}, "skipped": skipped}
    t0 = time.monotonic()
    for name, fn in (("attention", lambda: check_attention(device, dtypes, args.quick, budget, skipped)),
                     ("fused ops", lambda: check_fused(device, dtypes, args.quick, budget, skipped)),
                     ("cuda graphs", lambda: check_cuda_graphs(devices, budget, skipped)),
                     ("SD 2.1 768 fp16", lambda: check_sd21_fp16(device, budget, skipped)),
                     ("onnxruntime", lambda: check_onnxruntime(device, budget, skipped))):
        print(f"gpu_check: {name} ...", flush=True)
        try:
            report["sections"][name] = fn()
        except Exception:
            report["sections"][name] = "failed: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
        torch.cuda.empty_cache()
    report["seconds"] = round(time.monotonic() - t0, 1)
    failed = [(s, r) for s, rows in report["sections"].items() if isinstance(rows, list)
              for r in rows if r.get("passed") is False]
    report["failed"] = len(failed) + sum(isinstance(v, str) for v in report["sections"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    for s in skipped:
        print(f"skipped: {s}")
    print(f"gpu_check: {report['failed']} failed, report in {out}/gpu_check.md ({report['seconds']} s)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
