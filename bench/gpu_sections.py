"""gpu_check sections that check parts: the environment, the Triton attention kernel per head dim, the fused
ops, CUDA graphs on every GPU, ONNX Runtime's GPU providers. Each takes a gpu_check.Section and reports rows
(a row with `passed` False fails the section) and skips.

On a CPU (`gpu_check --rehearse`) the same code runs with tiny shapes in the Triton interpreter, to check
the harness itself; nothing it measures there says anything about a GPU.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsd.kernels import CUDAGraphRunner, backend_status, cuda_graphs_available
from fastsd.kernels.fused import geglu_torch, groupnorm_silu_torch
from fastsd.kernels.sdpa import sdpa_attention
from fastsd.kernels.triton_attention_configs import padded_head_dim
from fastsd.loading import load_model
from fastsd.optimize import OptimizeConfig
from fastsd.presets import DEFAULT_MODEL
from fastsd.verify import verify

from .kernels import SD15_LEVELS, SD21_LEVELS, _math_chunked, _version, time_ms

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# max abs error against the FP32 reference at unit-variance inputs (fastsd.reference uses the same scale)
ATTENTION_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
FUSED_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}
PACKAGES = ("fastsd", "diffusers", "transformers", "tokenizers", "safetensors", "triton", "pytorch-triton",
            "xformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy")
ORT_FIXED = (1, 23)  # onnxruntime honours InferenceSession(enable_fallback=0) from 1.23


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def rehearsal(s) -> bool:
    return s.device.type != "cuda"


def dtypes(s) -> list:
    if rehearsal(s):
        return [torch.float32]
    extra = [torch.bfloat16] if not s.quick and torch.cuda.is_bf16_supported() else []
    return [torch.float16] + extra


# -- environment ---------------------------------------------------------------------------------------
def torch_triton_requirement() -> str | None:
    """The triton requirement torch declares (a CUDA torch from PyPI: 'triton~=3.9.0 ; ...'), or None."""
    for req in importlib.metadata.requires("torch") or []:
        name = req.split(";")[0].strip()
        if name.startswith(("triton", "pytorch-triton")):
            return name
    return None


def _satisfies(requirement: str, version: str) -> bool | None:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def environment(s) -> None:
    s.note(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           packages={p: _version(p) for p in PACKAGES}, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"))
    for d in s.devices:
        if d.type != "cuda":
            s.row(what=f"{d}: no GPU (rehearsal)")
            continue
        props = torch.cuda.get_device_properties(d)
        s.row(what=f"{d} {props.name}", capability=f"{props.major}.{props.minor}",
              memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
              smem_per_block_optin_kib=getattr(props, "shared_memory_per_block_optin", 0) // 1024)
    want = torch_triton_requirement()
    have = next((v for v in (_version("triton"), _version("pytorch-triton")) if v != "not installed"), None)
    if want is None:
        s.row(what="triton as torch asks", required="(this torch declares no triton)", installed=have)
    else:
        ok = have is not None and _satisfies(want, have) is not False
        s.row(what="triton as torch asks", required=want, installed=have, passed=ok,
              **({} if ok else {"error": f"torch asks for {want}, {have or 'none'} is installed"}))
    status = {name: list(v) for name, v in backend_status(s.device, dtypes(s)[0]).items()}
    s.note(attention_backends=status)  # the triton entry is the probe: a tiny kernel compiled and checked
    if importlib.util.find_spec("onnxruntime") is None:
        s.skip("onnxruntime: not installed (onnxruntime-gpu>=1.23 for the onnxruntime section)")
        return
    import onnxruntime as ort
    version = tuple(int(x) for x in ort.__version__.split(".")[:2] if x.isdigit())
    s.row(what="onnxruntime honours enable_fallback=0", version=ort.__version__,
          providers=",".join(ort.get_available_providers()), passed=version >= ORT_FIXED,
          **({} if version >= ORT_FIXED else {"error": "1.18-1.22 retry a failed provider on GPU 0 with no "
                                                       "options; fastsd refuses such sessions (pip install "
                                                       "'onnxruntime-gpu>=1.23')"}))


# -- kernels: Triton attention against SDPA per head dim -------------------------------------------------
def attention_cases(quick: bool, rehearse: bool) -> list[tuple]:
    """(model, level, kind, batch, heads, queries, keys, head dim): each SD head dim self and cross (quick:
    one level per head dim), every level and both kinds otherwise."""
    if rehearse:
        return [("tiny", f"d{d}", kind, 1, 2, 70, 70 if kind == "self" else 77, d)
                for d in (40, 64, 80, 160) for kind in ("self", "cross")]
    cases = []
    for model, levels in (("SD 1.5", SD15_LEVELS), ("SD 2.1", SD21_LEVELS)):
        seen = set()
        for label, side, heads, d in levels:
            if quick and (model, d) in seen:
                continue
            seen.add((model, d))
            for kind in ("self", "cross"):
                cases.append((model, label, kind, 2, heads, side * side, side * side if kind == "self" else 77, d))
    return cases


def kernels(s) -> None:
    if importlib.util.find_spec("triton") is None:
        s.skip("triton is not installed (a CUDA torch from PyPI brings the triton it was built with)")
        return
    from fastsd.kernels import triton_attention_kernel as K  # lazy: imports triton

    repeat = 3 if s.quick else 10
    for dtype in dtypes(s):
        name = DTYPE_NAMES[dtype]
        ok, why = backend_status(s.device, dtype)["triton"]
        if not ok:
            s.row(what=f"triton attention available ({name})", passed=False, error=why)
            continue
        for model, level, kind, b, h, m, n, d in attention_cases(s.quick, rehearsal(s)):
            what = f"{model} {level} {kind} d{d} {name}"
            if not s.enough(8, what):
                break
            g = torch.Generator(device="cpu").manual_seed(d + m)
            q = torch.randn(b, h, m, d, generator=g).to(s.device, dtype)
            k = torch.randn(b, h, n, d, generator=g).to(s.device, dtype)
            v = torch.randn(b, h, n, d, generator=g).to(s.device, dtype)
            scale = d ** -0.5
            ref = _math_chunked(q.float(), k.float(), v.float(), scale)
            row = {"what": what, "shape": [b, h, m, n, d], "padded_d": padded_head_dim(d)}
            why = K.unusable_reason(q, n)
            if why:
                s.row(**row, skipped=why)  # the processor sends such calls to sdpa
                continue
            try:
                out = K.flash_attention(q, k, v, scale=scale)  # the first call compiles and autotunes
                sdpa = sdpa_attention(q, k, v, scale=scale, upcast=True)
                err, err_sdpa = ((x.float() - ref).abs().max().item() for x in (out, sdpa))
                tol = ATTENTION_TOL[dtype]
                row.update(max_abs=err, max_abs_sdpa=err_sdpa, vs_sdpa=(out.float() - sdpa.float()).abs().max().item(),
                           tolerance=tol, passed=err <= tol)
                if not rehearsal(s):
                    row.update(triton_ms=round(time_ms(lambda: K.flash_attention(q, k, v, scale=scale), s.device,
                                                       repeat), 4),
                               sdpa_ms=round(time_ms(lambda: sdpa_attention(q, k, v, scale=scale, upcast=True),
                                                     s.device, repeat), 4))
            except Exception as exc:  # a compile or launch failure is this check's finding
                row.update(passed=False, error=_first_line(exc))
            s.row(**row)
            del q, k, v, ref


# -- fused ops -----------------------------------------------------------------------------------------
GN_QUICK = [(2, 320, 64, 64), (2, 1280, 16, 16), (1, 128, 256, 256)]
GN_FULL = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (16, 1280, 8, 8),
           (1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512)]
GEGLU_QUICK = [(2, 1024, 2 * 2560)]
GEGLU_FULL = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120)]


def fused(s) -> None:
    if importlib.util.find_spec("triton") is None:
        s.skip("triton is not installed")
        return
    from fastsd.kernels import triton_geglu, triton_norm  # lazy: imports triton

    gn = [(1, 32, 6, 5), (2, 16, 4, 4)] if rehearsal(s) else GN_QUICK if s.quick else GN_FULL
    gg = [(2, 5, 2 * 40)] if rehearsal(s) else GEGLU_QUICK if s.quick else GEGLU_FULL
    repeat = 3 if s.quick else 10
    for dtype in dtypes(s):
        name = DTYPE_NAMES[dtype]
        cases = [("groupnorm_silu", shape, layout) for shape in gn for layout in ("nchw", "channels_last")]
        cases += [("geglu", shape, "") for shape in gg]
        for op, shape, layout in cases:
            what = f"{op} {'x'.join(map(str, shape))} {layout} {name}".replace("  ", " ")
            if not s.enough(5, what):
                return
            g = torch.Generator(device="cpu").manual_seed(1)
            x = torch.randn(*shape, generator=g).to(s.device, dtype)
            row = {"what": what}
            try:
                if op == "groupnorm_silu":
                    if layout == "channels_last":
                        x = x.to(memory_format=torch.channels_last)
                    w = torch.randn(shape[1], generator=g).to(s.device, dtype)
                    b = torch.randn(shape[1], generator=g).to(s.device, dtype)
                    groups = 32 if shape[1] % 32 == 0 else 8
                    ref = groupnorm_silu_torch(x.float(), groups, w.float(), b.float())

                    def kernel():
                        return triton_norm.groupnorm_silu(x, groups, w, b)

                    def torch_op():
                        return F.silu(F.group_norm(x, groups, w, b))

                    plan = triton_norm.launch_plan(shape[0] * groups, shape[1] // groups * shape[2] * shape[3],
                                                   triton_norm.sm_count(s.device) if s.device.type == "cuda" else 1,
                                                   interpreted=triton_norm.INTERPRETED)
                    row.update(rows_per_program=plan.rows, programs=plan.programs)
                else:
                    ref = geglu_torch(x.float())

                    def kernel():
                        return triton_geglu.geglu(x)

                    def torch_op():
                        a, gate = x.chunk(2, dim=-1)
                        return a * F.gelu(gate)
                out = kernel()
                err = (out.float() - ref).abs().max().item()
                layout_kept = op != "groupnorm_silu" or layout != "channels_last" or \
                    out.is_contiguous(memory_format=torch.channels_last)
                row.update(max_abs=err, tolerance=FUSED_TOL[dtype], passed=err <= FUSED_TOL[dtype] and layout_kept)
                if not layout_kept:
                    row["error"] = "channels_last input gave a differently laid out output"
                if not rehearsal(s):
                    row.update(triton_ms=round(time_ms(kernel, s.device, repeat), 4),
                               torch_ms=round(time_ms(torch_op, s.device, repeat), 4))
            except Exception as exc:
                row.update(passed=False, error=_first_line(exc))
            s.row(**row)


# -- CUDA graphs on every visible GPU ---------------------------------------------------------------------
def cuda_graphs(s) -> None:
    ok, why = cuda_graphs_available(s.device)
    if not ok:
        s.skip(why)
        return
    if len(s.devices) == 1:
        s.skip("one GPU visible: a second device's capture (its own capture stream) is not exercised")
    for device in s.devices:  # cuda:0 first, then the others: the order that left cuda:1's graph empty
        if not s.enough(10, f"cuda graphs on {device}"):
            return
        unet = load_model("tiny", random_weights=True).unet.to(device, torch.float16).eval()
        runner = CUDAGraphRunner(unet, max_graphs=4, device=device)
        size, dim = unet.config.sample_size, unet.config.cross_attention_dim

        def inputs(batch, seed):
            g = torch.Generator(device="cpu").manual_seed(seed)
            return (torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, torch.float16),
                    torch.tensor(10.0 * seed, device=device),
                    torch.randn(batch, 77, dim, generator=g).to(device, torch.float16))

        def eager(sample, t, ehs):
            with torch.no_grad():
                return unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]

        for batch in (1, 2):
            row = {"what": f"{device} batch {batch}: capture, then replays on new inputs"}
            try:
                errs = []
                for call in range(3):
                    x = inputs(batch, 10 * batch + call)
                    errs.append((runner(*x).float() - eager(*x).float()).abs().max().item())
                row.update(max_abs=max(errs), captures=runner.captures, replays=runner.replays,
                           passed=max(errs) <= 1e-2)
            except Exception as exc:
                row.update(passed=False, error=_first_line(exc))
            s.row(**row)
        row = {"what": f"{device}: two threads on one runner"}
        try:
            cases = [inputs(1, 100 + i) for i in range(8)]
            want = [eager(*x) for x in cases]
            got: dict[int, torch.Tensor] = {}

            def worker(lo):
                for i in range(lo, len(cases), 2):
                    got[i] = runner(*cases[i])

            threads = [threading.Thread(target=worker, args=(lo,)) for lo in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            err = max((got[i].float() - want[i].float()).abs().max().item() for i in range(len(cases)))
            row.update(max_abs=err, passed=err <= 1e-2)
        except Exception as exc:
            row.update(passed=False, error=_first_line(exc))
        s.row(**row)
        del runner, unet
        torch.cuda.empty_cache()


# -- ONNX Runtime's CUDA and TensorRT providers -------------------------------------------------------------
def onnxruntime(s) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        s.skip("onnxruntime is not installed (pip install 'onnxruntime-gpu>=1.23')")
        return
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
    if not wanted:
        s.skip(f"onnxruntime {ort.__version__} has no GPU provider ({', '.join(available)}): install "
               "onnxruntime-gpu in place of onnxruntime")
        return
    if importlib.util.find_spec("onnx") is None:
        s.skip("onnx is not installed: the export needs it")
        return
    from fastsd.export import export_model, load_onnx_model, reference_model  # lazy: the exporter imports onnx

    devices = s.devices if len(s.devices) > 1 else [s.device]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        export_model(load_model(DEFAULT_MODEL), out, components="text_encoder,unet,vae_decoder", progress=False,
                     echo=None)
        for device in devices:
            for provider in wanted:
                what = f"{provider} on {device}"
                if not s.enough(40 if provider.startswith("Tensorrt") else 10, what):
                    continue
                chain = [provider] + (["CUDAExecutionProvider"] if provider != "CUDAExecutionProvider" else []) \
                    + ["CPUExecutionProvider"]
                row = {"what": what}
                old = os.environ.get("FASTSD_ORT_PROVIDERS")
                os.environ["FASTSD_ORT_PROVIDERS"] = ",".join(chain)
                try:
                    onnx_model = load_onnx_model(out)
                    report, engine, _, _ = verify(reference_model(onnx_model, safety_checker=False),
                                                  OptimizeConfig(backend="onnxruntime", device=str(device),
                                                                 safety_checker=False),
                                                  prompts=["a red circle"], steps=4, engine_model=onnx_model)
                    got = engine.describe()["providers"]
                    placed = {k: g.session.get_provider_options().get(provider, {}).get("device_id")
                              for k, g in engine.backend.graphs.items()}
                    on_provider = all(v[0] == provider for v in got.values())
                    on_device = all(str(v) == str(device.index or 0) for v in placed.values())
                    row.update(psnr_db=[i["psnr_db"] for i in report["images"]], device_ids=placed,
                               passed=bool(report["passed"]) and on_provider and on_device)
                    if not on_provider:
                        row["error"] = f"sessions did not get {provider}: {got}"
                    elif not on_device:
                        row["error"] = f"sessions on the wrong GPU: {placed}"
                except Exception as exc:
                    row.update(passed=False, error=_first_line(exc))
                finally:
                    if old is None:
                        os.environ.pop("FASTSD_ORT_PROVIDERS", None)
                    else:
                        os.environ["FASTSD_ORT_PROVIDERS"] = old
                s.row(**row)
