"""GPU-path defects checked without a GPU: Triton version compatibility, launch configs that fit the
GPU, device guards for cuda:N (by recording the calls with a fake device), fused ops falling back when
Triton cannot build, out-of-memory during CUDA graph capture, and `auto` checking no more than it needs."""
import ast
import contextlib
import logging
import types
from pathlib import Path

import pytest
import torch

from conftest import needs_triton

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


# -- 1. Triton versions: the kernel modules must not need triton.knobs (Triton 3.4+) ------------------
def test_no_kernel_module_uses_triton_knobs():
    """torch 2.4-2.7 ship Triton 3.0-3.3, which have no triton.knobs: importing it crashed --fused-ops."""
    offenders = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("triton"):
                if node.module.startswith("triton.knobs") or any(a.name == "knobs" for a in node.names):
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("triton.knobs") for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and node.attr == "knobs" and isinstance(node.value, ast.Name) \
                    and node.value.id == "triton":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


@needs_triton
def test_interpreter_mode_is_read_from_the_kernel_object():
    from fastsd.kernels import triton_attention_kernel, triton_geglu, triton_norm
    from fastsd.kernels.triton_mode import is_interpreted

    assert triton_attention_kernel.INTERPRETED and triton_norm.INTERPRETED and triton_geglu.INTERPRETED
    assert not is_interpreted(lambda: None)


# -- 2. launch configs that fit the GPU ----------------------------------------------------------------
def test_fp32_head_dim_160_has_no_config_on_any_gpu_and_fp16_fits_sm86():
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT, CONFIGS, padded_head_dim, usable_configs

    assert padded_head_dim(160) == 256 and padded_head_dim(40) == 64 and padded_head_dim(80) == 128
    for arch, limit in ARCH_SMEM_LIMIT.items():
        assert usable_configs(256, True, limit) == [], arch  # 213-344 KB measured: nothing fits
    assert usable_configs(256, False, ARCH_SMEM_LIMIT[86])  # fp16 head dim 160 runs on an RTX 30xx
    for (kind, block_d), listed in CONFIGS.items():  # what is listed must be able to run somewhere
        for cfg, smem in listed:
            assert smem <= ARCH_SMEM_LIMIT[80], (kind, block_d, cfg)
    # 77 text tokens: no key tile wider than 128 (their next power of two)
    assert all(cfg[1] <= 128 for cfg in usable_configs(64, False, ARCH_SMEM_LIMIT[90], n_keys=77))


def _fake_q(shape, dtype, device="cuda:0"):
    return types.SimpleNamespace(shape=shape, dtype=dtype, device=torch.device(device))


@needs_triton
def test_calls_with_no_fitting_config_go_to_another_backend(monkeypatch):
    """The availability probe runs head dim 8; the per-call check sees head dim 160 in fp32 and says no, so
    the processor uses sdpa for that call instead of a launch that raises OutOfResources."""
    from fastsd.kernels import triton_attention, triton_attention_kernel as K
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT

    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(K, "device_smem_limit", lambda device: ARCH_SMEM_LIMIT[80])
    q32 = _fake_q((2, 8, 256, 160), torch.float32)
    k32 = _fake_q((2, 8, 256, 160), torch.float32)
    ok, why = triton_attention._supports(q32, k32, k32, None)
    assert not ok and "head dim 160" in why and "163 KB" in why
    q16 = _fake_q((2, 8, 256, 160), torch.float16)
    assert triton_attention._supports(q16, q16, q16, None) == (True, "")
    monkeypatch.setattr(K, "device_smem_limit", lambda device: 40 * 1024)  # a small GPU: fp16 160 no longer fits
    ok, why = triton_attention._supports(q16, q16, q16, None)
    assert not ok and "40 KB" in why


@needs_triton
def test_autotuner_gets_only_configs_that_fit():
    import triton

    from fastsd.kernels import triton_attention_kernel as K
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT, usable_configs

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in K.ALL_CONFIGS]
    kept = K._prune_configs(configs, {"N": 4096}, smem_limit=ARCH_SMEM_LIMIT[86], BLOCK_D=128, DOT_FP32=False)
    got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert got == set(usable_configs(128, False, ARCH_SMEM_LIMIT[86])) and got
    with pytest.raises(K.NoUsableConfig):
        K._prune_configs(configs, {"N": 4096}, smem_limit=ARCH_SMEM_LIMIT[80], BLOCK_D=256, DOT_FP32=True)


# -- 3. device guards (cuda:N) -----------------------------------------------------------------------------
class FakeCuda:
    """Stands in for torch.cuda's device, stream and graph calls, recording the current device at each."""

    def __init__(self):
        self.current = 0
        self.seen = []
        self.capture_streams = []  # the stream= each torch.cuda.graph capture was given

    def device(self, device):
        fake = self

        class _Guard:
            def __enter__(self):
                self.prev, fake.current = fake.current, torch.device(device).index
                return self

            def __exit__(self, *exc):
                fake.current = self.prev

        return _Guard()

    def record(self, what):
        self.seen.append((what, self.current))

    def install(self, monkeypatch):
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = fake.current if device is None else torch.device(device).index
                fake.record("Stream()")

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.record("replay")

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, **kw):
            fake.record("capture")
            fake.capture_streams.append(stream)
            yield

        @contextlib.contextmanager
        def stream(s):
            yield

        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
        return self


class FakeGpuTensor:
    def __init__(self, device):
        self.device = torch.device(device)

    def clone(self):
        return self

    def to(self, device=None, copy=False):
        return FakeGpuTensor(device if device is not None else self.device)


def test_cuda_graph_capture_and_replay_run_on_the_inputs_device(monkeypatch):
    from fastsd.kernels.cuda_graphs import capture_cuda_graph

    fake = FakeCuda().install(monkeypatch)
    calls = []

    def unet(sample, t, ehs):
        calls.append(fake.current)
        return "noise"

    x = FakeGpuTensor("cuda:1")
    captured = capture_cuda_graph(unet, (x, x, x), warmup=2)
    captured.replay()
    assert fake.current == 0  # the guard is undone afterwards
    assert set(calls) == {1}, calls  # warm-up and capture calls ran with cuda:1 current
    assert fake.seen and all(dev == 1 for _, dev in fake.seen), fake.seen
    assert [w for w, _ in fake.seen].count("capture") == 1 and ("replay", 1) in fake.seen


def test_each_device_captures_on_a_stream_of_its_own(monkeypatch):
    """torch.cuda.graph without stream= uses one class-wide capture stream, made on the device that captured
    first: cuda:1's capture then recorded on GPU 0's stream and came out empty. Each capture must pass a
    stream made on its own device, and its static inputs must live there."""
    from fastsd.kernels.cuda_graphs import capture_cuda_graph

    fake = FakeCuda().install(monkeypatch)
    for dev in ("cuda:0", "cuda:1"):
        x = FakeGpuTensor(dev)
        captured = capture_cuda_graph(lambda *a: "noise", (x, FakeGpuTensor("cuda:0"), x), warmup=1)
        assert all(t.device == torch.device(dev) for t in captured.static_inputs)
    first, second = fake.capture_streams
    assert first is not None and second is not None and first is not second
    assert (first.device, second.device) == (0, 1)


def test_on_device_is_a_noop_for_cpu_and_a_cuda_guard_for_cuda():
    from fastsd.kernels.device_guard import on_device

    assert isinstance(on_device("cpu"), contextlib.nullcontext)
    guard = on_device("cuda:1")
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without touching CUDA


def _recording_guard(module, monkeypatch):
    state = {"inside": None, "devices": []}

    @contextlib.contextmanager
    def on_device(device):
        state["devices"].append(torch.device(device))
        state["inside"] = torch.device(device)
        try:
            yield
        finally:
            state["inside"] = None

    monkeypatch.setattr(module, "on_device", on_device)
    return state


class _Launcher:
    def __init__(self, state):
        self.state, self.launches = state, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.state["inside"])
        return launch


@needs_triton
def test_triton_launches_run_under_a_guard_for_the_tensors_device(monkeypatch):
    from fastsd.kernels import triton_attention_kernel as A, triton_geglu as G, triton_norm as N
    from fastsd.kernels.triton_attention_configs import ARCH_SMEM_LIMIT

    x = torch.randn(1, 4, 3, 3)
    for module, attr, call in (
            (N, "_groupnorm_silu_fwd", lambda: N.groupnorm_silu(x, 2, None, None)),
            (G, "_geglu_fwd", lambda: G.geglu(torch.randn(3, 8))),
    ):
        state = _recording_guard(module, monkeypatch)
        launcher = _Launcher(state)
        monkeypatch.setattr(module, attr, launcher)
        call()
        assert launcher.launches == [torch.device("cpu")], (module.__name__, launcher.launches)
    # the compiled attention path (the interpreter path needs no guard: CPU tensors)
    state = _recording_guard(A, monkeypatch)
    launcher = _Launcher(state)
    monkeypatch.setattr(A, "INTERPRETED", False)
    monkeypatch.setattr(A, "device_smem_limit", lambda device: ARCH_SMEM_LIMIT[80])
    monkeypatch.setattr(A, "_tuned_kernel", lambda limit: launcher)
    q = torch.randn(1, 2, 16, 40)
    A.flash_attention(q, q, q)
    assert launcher.launches == [q.device]


# -- 4. fused ops fall back to torch when Triton cannot build --------------------------------------------
@needs_triton
def test_fused_op_probe_fails_over_to_torch_when_triton_cannot_build(monkeypatch):
    from fastsd.kernels import fused, triton_norm

    def no_compiler(*a, **k):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(triton_norm, "groupnorm_silu", no_compiler)
    ok, why = fused.fused_op_available("groupnorm_silu", "cpu", torch.float32)
    assert not ok and "probe call failed" in why and "C compiler" in why
    # on a GPU the same failure must leave the torch implementation in place
    monkeypatch.setattr(fused, "triton_status", lambda device: (True, "pretend CUDA"))
    fused.clear_probe_cache()
    assert fused._resolve_impl("groupnorm_silu", "auto", "cuda", torch.float16) == "torch"


@needs_triton
def test_fused_ops_survive_a_kernel_module_that_cannot_import(monkeypatch, unet):
    from fastsd.kernels import fused

    def old_triton(op):
        raise ImportError("cannot import name 'knobs' from 'triton'")

    monkeypatch.setattr(fused, "_kernel", old_triton)
    monkeypatch.setattr(fused, "triton_status", lambda device: (True, "pretend CUDA"))
    ok, why = fused.fused_op_available("geglu", "cuda", torch.float16)
    assert not ok and "failed to import" in why and "knobs" in why
    applied = fused.apply_fused_ops(unet, None, "cuda", torch.float16, fuse_qkv=False)
    assert applied == ["groupnorm_silu", "geglu"]
    impls = {m._fastsd_impl for m in unet.modules() if hasattr(m, "_fastsd_impl")}
    assert impls == {"torch"}


# -- 4b. a launch that fails to compile on this GPU: the fallback runs the call, logged once --------------
@needs_triton
def test_attention_launch_that_cannot_compile_falls_back_to_sdpa_once(monkeypatch, caplog):
    """One config left for a shape means no autotuning beforehand: on a smaller GPU its first launch raises
    OutOfResources. That call and the later ones of the same head dim and dtype run on sdpa, logged once;
    any other error is raised."""
    from triton.runtime.errors import OutOfResources

    from fastsd.kernels import triton_attention, triton_attention_kernel as K
    from fastsd.kernels.sdpa import sdpa_attention
    from fastsd.kernels.triton_launch import FailedLaunches

    monkeypatch.setattr(triton_attention, "_failed", FailedLaunches("attention", "sdpa"))
    calls = []

    def too_big(q, k, v, scale=None):
        calls.append(q.shape[-1])
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(K, "flash_attention", too_big)
    q = torch.randn(1, 2, 16, 80)
    with caplog.at_level(logging.WARNING, logger="fastsd.kernels"):
        for _ in range(3):
            out = triton_attention.triton_attention(q, q, q, scale=0.1)
            assert torch.equal(out, sdpa_attention(q, q, q, scale=0.1))
    assert calls == [80]  # tried once, then straight to sdpa
    assert caplog.text.count("cannot launch") == 1 and "OutOfResources" in caplog.text
    ok, why = triton_attention._supports(q, q, q, None)
    assert not ok and "failed to launch" in why
    assert triton_attention._supports(torch.randn(1, 2, 16, 40), q[..., :40], q[..., :40], None)[0]

    def bug(q, k, v, scale=None):
        raise IndexError("a bug, not a launch failure")

    monkeypatch.setattr(K, "flash_attention", bug)
    with pytest.raises(IndexError):
        triton_attention.triton_attention(torch.randn(1, 2, 16, 40), q[..., :40], q[..., :40], scale=0.1)


@needs_triton
def test_fused_op_launch_that_cannot_compile_falls_back_to_torch(monkeypatch, unet, caplog):
    from triton.runtime.errors import PTXASError

    from fastsd.kernels import fused, triton_geglu, triton_norm
    from fastsd.kernels.triton_launch import FailedLaunches

    monkeypatch.setattr(fused, "_failed", FailedLaunches("fused op", "the torch implementation"))
    sample, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=ehs).sample
    monkeypatch.setattr(fused, "_resolve_impl", lambda op, impl, device, dtype: "triton")
    fused.apply_fused_ops(unet, None, "cpu", torch.float32, fuse_qkv=False)
    tried = []

    def broken(*a, **k):
        tried.append(1)
        raise PTXASError("ptxas fatal: Entry function uses too much shared data")

    monkeypatch.setattr(triton_norm, "groupnorm_silu", broken)
    monkeypatch.setattr(triton_geglu, "geglu", broken)
    with caplog.at_level(logging.WARNING, logger="fastsd.kernels"), torch.no_grad():
        for _ in range(2):
            assert (unet(sample, t, encoder_hidden_states=ehs).sample - ref).abs().max() < 1e-5
    assert len(tried) == 2  # one failed launch per op, then torch without trying again
    assert caplog.text.count("cannot launch") == 2


# -- 5. CUDA graph capture out of memory ------------------------------------------------------------------
def _graph(value, inputs):
    from fastsd.kernels.cuda_graphs import CapturedGraph

    return CapturedGraph(tuple(t.clone() for t in inputs), lambda: None, torch.full((1,), value))


def test_capture_out_of_memory_drops_cached_graphs_then_retries_then_runs_eagerly():
    from fastsd.kernels import CUDAGraphRunner

    plan = []

    def capture(fn, inputs):
        outcome = plan.pop(0)
        if outcome == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _graph(outcome, inputs)

    def eager(sample, t, ehs):
        return sample + 7

    runner = CUDAGraphRunner(eager, capture_fn=capture, max_graphs=4)
    ehs = torch.zeros(1, 77, 32)
    plan[:] = [1.0]
    assert runner(torch.zeros(1, 4, 8, 8), 1, ehs).max() == 1.0  # captured
    plan[:] = ["oom", 2.0]  # a new shape: OOM, drop the cached graph, retry succeeds
    assert runner(torch.zeros(1, 4, 16, 16), 1, ehs).max() == 2.0
    assert len(runner.cached_keys()) == 1 and runner.evictions == 1
    plan[:] = ["oom", "oom"]  # OOM twice: that shape runs eagerly, now and later, without new captures
    out = runner(torch.zeros(1, 4, 32, 32), 1, ehs)
    assert out.max() == 7.0 and runner.eager_calls == 1
    assert runner(torch.zeros(1, 4, 32, 32), 1, ehs).max() == 7.0 and runner.eager_calls == 2 and plan == []


def test_out_of_memory_retry_runs_after_the_failed_capture_is_freed():
    """The first capture's frame (its half-built graph and static inputs) is held by the exception's
    traceback while the `except` block runs: the retry must come after it, with that memory released."""
    import weakref

    from fastsd.kernels import CUDAGraphRunner

    class HalfBuiltGraph:
        pass

    seen = {}

    def capture(fn, inputs):
        if "failed" not in seen:
            graph = HalfBuiltGraph()  # noqa: F841  (held by this frame, as a real capture's graph is)
            seen["failed"] = weakref.ref(graph)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen["alive_at_retry"] = seen["failed"]() is not None
        return _graph(3.0, inputs)

    runner = CUDAGraphRunner(lambda s, t, e: s, capture_fn=capture)
    assert runner(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, 32)).max() == 3.0
    assert seen["alive_at_retry"] is False


def test_one_call_at_a_time_on_the_static_buffers():
    """Threads sharing an accelerated pipeline share its graphs' static buffers: without a lock, one thread's
    copy-in lands between another's copy-in and replay, and it gets the other's result."""
    import threading
    import time

    from fastsd.kernels import CUDAGraphRunner
    from fastsd.kernels.cuda_graphs import CapturedGraph

    def capture(fn, inputs):
        static = tuple(t.clone() for t in inputs)
        out = torch.zeros_like(static[0])

        def replay():
            value = static[0].clone()
            time.sleep(0.002)  # a replay takes time on a GPU too
            out.copy_(value * 2)
        return CapturedGraph(static, replay, out)

    runner = CUDAGraphRunner(lambda s, t, e: s * 2, capture_fn=capture)
    ehs = torch.zeros(1, 77, 8)
    wrong = []

    def worker(i):
        for _ in range(20):
            x = torch.full((1, 4, 8, 8), float(i))
            if runner(x, 1, ehs).max().item() != 2.0 * i:
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and runner.captures == 1 and runner.replays == 120


# -- 6. `auto` stops checking at the first backend that can run ---------------------------------------------
def test_auto_checks_no_backend_ranked_below_the_winner(monkeypatch, caplog):
    from fastsd.kernels import registry
    from fastsd.kernels.registry import AttentionBackend, choose_attention, get_backend

    checked = []

    def costly(name):
        def check(device, dtype):
            checked.append(name)
            return True, "would compile and autotune"
        return check

    for name in ("xformers", "triton"):
        real = get_backend(name)
        monkeypatch.setitem(registry._REGISTRY, name, AttentionBackend(name, real.fn, costly(name)))
    monkeypatch.setitem(registry.AUTO_PREFERENCE, "cpu", ["sdpa", "xformers", "triton", "math"])
    with caplog.at_level(logging.INFO, logger="fastsd.kernels"):
        assert choose_attention("auto", "cpu", torch.float32) == "sdpa"
    assert checked == []
    assert "xformers: not checked (ranked below sdpa)" in caplog.text
