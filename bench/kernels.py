"""Kernel benchmark: attention backends and fused ops at Stable Diffusion shapes, side by side.

    python -m fastsd.bench.kernels            # every shape (minutes on a CPU)
    python -m fastsd.bench.kernels --quick    # a few shapes, ~1 minute on 2 CPU cores

For each shape it runs every attention backend that can run on the device, and prints the median time
in ms, the time ratio to `math` and to `sdpa` (backend time / reference time: below 1.00 is faster),
and the max abs difference from `math` (the FP32 reference). Backends that cannot run are listed with
the reason. On CPU the Triton interpreter is never timed (it takes seconds to minutes per call: it is a
test tool), so `triton` and `xformers` are reported as not run there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastsd.kernels import backend_status, fused_op_available, get_backend
from fastsd.kernels.fused import geglu_torch, groupnorm_silu_torch
from fastsd.kernels.math_attention import math_attention

# (label, latent side, heads, head_dim) per UNet level with attention, batch 2 (classifier-free guidance)
SD15_LEVELS = [("64x64", 64, 8, 40), ("32x32", 32, 8, 80), ("16x16", 16, 8, 160), ("8x8 mid", 8, 8, 160)]
SD21_LEVELS = [("96x96", 96, 5, 64), ("48x48", 48, 10, 64), ("24x24", 24, 20, 64), ("12x12 mid", 12, 20, 64)]
QUICK_ATTENTION = [("SD 1.5", "32x32", "self"), ("SD 1.5", "64x64", "cross"), ("SD 1.5", "16x16", "self"),
                   ("SD 2.1", "24x24", "self")]
GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8),  # UNet, batch 2
             (1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512)]  # VAE decoder
QUICK_GN = [(2, 320, 64, 64), (2, 1280, 16, 16)]
GEGLU_SHAPES = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120)]
QUICK_GEGLU = [(2, 1024, 2 * 2560)]
MATH_CHUNK_BYTES = 1 << 30  # math materialises fp32 scores; above this, run it (batch*head) slice by slice


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_report(device: torch.device) -> str:
    lines = [f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
             f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    try:
        load = os.getloadavg()
        lines.append(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (timings on a busy machine are noisy)")
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm{props.major}{props.minor}")
    lines.append("versions: " + ", ".join(f"{p} {_version(p)}" for p in ("torch", "triton", "xformers", "diffusers")))
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    return "\n".join(lines)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _math_chunked(q, k, v, scale):
    b, h, m, _ = q.shape
    n = k.shape[2]
    if b * h * m * n * 4 * 2 <= MATH_CHUNK_BYTES:
        return math_attention(q, k, v, scale=scale)
    out = torch.empty_like(q)
    for i in range(b):
        for j in range(h):
            out[i:i + 1, j:j + 1] = math_attention(q[i:i + 1, j:j + 1], k[i:i + 1, j:j + 1],
                                                   v[i:i + 1, j:j + 1], scale=scale)
    return out


def attention_cases(quick: bool):
    models = {"SD 1.5": SD15_LEVELS, "SD 2.1": SD21_LEVELS}
    cases = []
    for model, levels in models.items():
        for label, side, heads, d in levels:
            for kind in ("self", "cross"):
                if quick and (model, label, kind) not in QUICK_ATTENTION:
                    continue
                tokens = side * side
                cases.append((model, label, kind, 2, heads, tokens, tokens if kind == "self" else 77, d))
    return cases


def _row(name, ms, ref_math, ref_sdpa, err):
    def ratio(ref):
        return f"{ms / ref:7.2f}x" if ref else "      - "
    err_s = "       -" if err is None else f"{err:8.1e}"
    return f"  {name:<10}{ms:10.2f}  {ratio(ref_math)}  {ratio(ref_sdpa)}  {err_s}"


def bench_attention(device, dtype, quick, repeat, out=print):
    status = backend_status(device, dtype)
    runnable, skipped = [], {}
    for name, (ok, reason) in status.items():
        if name == "triton" and device.type == "cpu":
            skipped[name] = ("the Triton interpreter is a test tool (seconds to minutes per call here); "
                             "compiled Triton needs a CUDA GPU" if ok else reason)
        elif ok:
            runnable.append(name)
        else:
            skipped[name] = reason
    order = ["math", "sdpa"] + [n for n in runnable if n not in ("math", "sdpa")]
    runnable = [n for n in order if n in runnable]
    out(f"\n## Attention ({str(dtype).replace('torch.', '')}, {device}); time ratio = backend ms / reference ms")
    for name, why in skipped.items():
        out(f"  not run: {name}: {why}")
    for model, label, kind, b, h, m, n, d in attention_cases(quick):
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(b, h, m, d, generator=g).to(device, dtype)
        k = torch.randn(b, h, n, d, generator=g).to(device, dtype)
        v = torch.randn(b, h, n, d, generator=g).to(device, dtype)
        scale = d ** -0.5
        out(f"\n### {model} {label} {kind}-attention: q {tuple(q.shape)}, k/v {tuple(k.shape)}")
        out(f"  {'backend':<10}{'ms':>10}  {'vs math':>8}  {'vs sdpa':>8}  {'max|err|':>8}")
        ref = None
        times = {}
        for name in runnable:
            if name == "math":
                fn = lambda: _math_chunked(q, k, v, scale)  # noqa: E731
            else:
                bfn = get_backend(name).fn
                fn = lambda bfn=bfn: bfn(q, k, v, scale=scale, attn_mask=None, upcast=False)  # noqa: E731
            try:
                ms = time_ms(fn, device, repeat)
                result = fn()
            except Exception as exc:  # report, keep going
                out(f"  {name:<10} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            times[name] = ms
            if name == "math":
                ref = result.float()
            err = None if ref is None else (result.float() - ref).abs().max().item()
            out(_row(name, ms, times.get("math"), times.get("sdpa"), err))
            del result


def bench_groupnorm_silu(device, dtype, quick, repeat, out=print):
    ok, reason = fused_op_available("groupnorm_silu", device, dtype)
    run_triton = ok and device.type == "cuda"
    out(f"\n## GroupNorm(32)+SiLU ({str(dtype).replace('torch.', '')}, {device}); "
        f"ratio = ms / ms of torch group_norm then silu (diffusers' way)")
    if not run_triton:
        out(f"  not run: triton: {reason if not ok else 'the Triton interpreter is a test tool, not timed'}")
    out(f"  {'shape':<22}{'torch (2 ops)':>14}{'torch inplace':>15}{'triton':>10}{'ratio':>8}{'max|err|':>10}")
    for shape in (QUICK_GN if quick else GN_SHAPES):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device, dtype)
        w = torch.randn(shape[1], generator=g).to(device, dtype)
        b = torch.randn(shape[1], generator=g).to(device, dtype)
        two = time_ms(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)), device, repeat)
        inplace = time_ms(lambda: groupnorm_silu_torch(x, 32, w, b, 1e-5), device, repeat)
        cells = [f"  {str(shape):<22}{two:14.2f}{inplace:15.2f}"]
        if run_triton:
            from fastsd.kernels.triton_norm import groupnorm_silu as kernel  # imports triton: only when run

            t = time_ms(lambda: kernel(x, 32, w, b, 1e-5), device, repeat)
            ref = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5))
            err = (kernel(x, 32, w, b, 1e-5).float() - ref).abs().max().item()
            cells.append(f"{t:10.2f}{t / two:7.2f}x{err:10.1e}")
        else:
            err = (groupnorm_silu_torch(x, 32, w, b, 1e-5) - F.silu(F.group_norm(x, 32, w, b, 1e-5))).abs().max()
            cells.append(f"{'-':>10}{inplace / two:7.2f}x{err.item():10.1e}")
        out("".join(cells))


def bench_geglu(device, dtype, quick, repeat, out=print):
    ok, reason = fused_op_available("geglu", device, dtype)
    run_triton = ok and device.type == "cuda"
    out(f"\n## GEGLU activation ({str(dtype).replace('torch.', '')}, {device}); ratio = ms / ms of diffusers' "
        f"a * gelu(gate)")
    if not run_triton:
        out(f"  not run: triton: {reason if not ok else 'the Triton interpreter is a test tool, not timed'}")
    out(f"  {'shape':<22}{'diffusers':>10}{'torch inplace':>15}{'triton':>10}{'ratio':>8}")

    def diffusers_geglu(x):
        a, gate = x.chunk(2, -1)
        return a * F.gelu(gate)

    for shape in (QUICK_GEGLU if quick else GEGLU_SHAPES):
        x = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(0)).to(device, dtype)
        base = time_ms(lambda: diffusers_geglu(x), device, repeat)
        inplace = time_ms(lambda: geglu_torch(x), device, repeat)
        line = f"  {str(shape):<22}{base:10.2f}{inplace:15.2f}"
        if run_triton:
            from fastsd.kernels.triton_geglu import geglu as kernel  # imports triton: only when run

            t = time_ms(lambda: kernel(x), device, repeat)
            line += f"{t:10.2f}{t / base:7.2f}x"
        else:
            line += f"{'-':>10}{inplace / base:7.2f}x"
        out(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few representative shapes only")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per case (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a shared machine 1 thread gives steadier numbers")
    ap.add_argument("--only", choices=["attention", "groupnorm", "geglu"], default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    repeat = args.repeat or (3 if args.quick else 5)

    print("# fastsd kernel benchmark" + (" (--quick)" if args.quick else ""))
    print(hardware_report(device))
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, median of {repeat} runs after 1 warm-up")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.only in (None, "attention"):
            bench_attention(device, dtype, args.quick, repeat)
        if args.only in (None, "groupnorm"):
            bench_groupnorm_silu(device, dtype, args.quick, repeat)
        if args.only in (None, "geglu"):
            bench_geglu(device, dtype, args.quick, repeat)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
