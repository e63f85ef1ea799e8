"""The backend registry: availability checks, clear errors, and `auto` never picking what cannot run."""

import logging
import sys
import types

import pytest
import torch

from fastsd.kernels import (
    AttentionBackend,
    BackendUnavailable,
    backend_status,
    choose_attention,
    list_backends,
    register_backend,
    unregister_backend,
)


def test_builtin_backends_registered():
    assert {"math", "sdpa", "xformers", "triton"} <= set(list_backends())


def test_cpu_auto_is_sdpa():
    assert choose_attention("auto", "cpu", torch.float32) == "sdpa"
    assert choose_attention("auto", torch.device("cpu"), torch.float16) == "sdpa"


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        choose_attention("flash9", "cpu", torch.float32)


def test_unavailable_by_name_is_clear(monkeypatch):
    # xformers is either missing or CUDA-only here: both are unavailable on CPU.
    with pytest.raises(BackendUnavailable) as info:
        choose_attention("xformers", "cpu", torch.float16)
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    assert "'xformers'" in msg and "unavailable" in msg and "cpu" in msg
    assert "Available here:" in msg and "sdpa" in msg and "math" in msg
    assert err.name == "xformers" and "sdpa" in err.available and err.reason


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = backend_status("cpu", torch.float32)["triton"]
    assert not ok
    assert ("no CPU backend" in reason) or ("not installed" in reason)
    with pytest.raises(BackendUnavailable, match="triton"):
        choose_attention("triton", "cpu", torch.float32)


def test_triton_unavailable_on_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ok, reason = backend_status("cuda", torch.float16)["triton"]
    assert not ok and ("is_available() is False" in reason or "not installed" in reason)


def _fake_xformers(monkeypatch, calls):
    """A stand-in xformers package whose memory_efficient_attention raises NotImplementedError
    (what the real 0.0.35 does on CPU tensors), installed into sys.modules."""
    pkg = types.ModuleType("xformers")
    pkg.__version__ = "0.0.35-fake"
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        calls.append(q.device.type)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: cpu")

    ops.memory_efficient_attention = memory_efficient_attention
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_detected_by_trying_a_call(monkeypatch, caplog):
    from fastsd.kernels import registry

    calls = []
    _fake_xformers(monkeypatch, calls)
    # Make `auto` on CPU prefer xformers: it must still not be chosen, because the probe call fails.
    monkeypatch.setitem(registry.AUTO_PREFERENCE, "cpu", ["xformers", "sdpa", "math"])
    with caplog.at_level(logging.INFO, logger="fastsd.kernels"):
        assert choose_attention("auto", "cpu", torch.float16) == "sdpa"
    assert calls == ["cpu"]  # it tried a tiny call
    ok, reason = backend_status("cpu", torch.float16)["xformers"]
    assert not ok and "installed but memory_efficient_attention cannot run" in reason
    assert "NotImplementedError" in reason
    assert calls == ["cpu"]  # and cached the answer
    text = caplog.text
    assert "chose 'sdpa'" in text and "xformers: xformers 0.0.35-fake is installed" in text
    with pytest.raises(BackendUnavailable, match="NotImplementedError"):
        choose_attention("xformers", "cpu", torch.float16)


def test_xformers_that_works_is_used_when_preferred(monkeypatch):
    from fastsd.kernels import registry

    pkg = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")

    def mea(q, k, v, attn_bias=None, scale=None):  # BMHK, like the real one
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)

    ops.memory_efficient_attention = mea
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setitem(registry.AUTO_PREFERENCE, "cpu", ["xformers", "sdpa"])
    assert choose_attention("auto", "cpu", torch.float32) == "xformers"
    q = torch.randn(1, 2, 5, 8)
    out = registry.attention(q, q, q, backend="xformers")
    ref = registry.attention(q, q, q, backend="math")
    assert (out - ref).abs().max() < 1e-5


def test_auto_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger="fastsd.kernels"):
        choose_attention("auto", "cpu", torch.float32)
        choose_attention("auto", "cpu", torch.float32)
    records = [r for r in caplog.records if "chose" in r.getMessage()]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "'sdpa'" in msg and "passed over" in msg and "triton" in msg and "xformers" in msg


def test_auto_skips_broken_backend_and_check_errors():
    from fastsd.kernels import registry

    def broken_check(device, dtype):
        raise RuntimeError("driver exploded")

    register_backend(AttentionBackend("broken", fn=lambda *a, **k: None, check=broken_check))
    try:
        registry.AUTO_PREFERENCE["cpu"].insert(0, "broken")
        assert choose_attention("auto", "cpu", torch.float32) == "sdpa"
        ok, reason = backend_status("cpu", torch.float32)["broken"]
        assert not ok and "driver exploded" in reason
    finally:
        registry.AUTO_PREFERENCE["cpu"].remove("broken")
        unregister_backend("broken")


def test_math_and_sdpa_agree():
    from fastsd.kernels import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 40, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 50, 50, generator=g)
    for m in (None, mask):
        ref = attention(q, k, v, backend="math", attn_mask=m)
        out = attention(q, k, v, backend="sdpa", attn_mask=m)
        assert (out - ref).abs().max() < 1e-5


def test_sdpa_upcast_fp16_large_scores():
    # Scores ~ 1e5 overflow fp16; with upcast the sdpa backend computes in fp32 and matches math.
    from fastsd.kernels import attention

    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 16, 64, generator=g) * 60).half()
    k = (torch.randn(1, 2, 16, 64, generator=g) * 60).half()
    v = torch.randn(1, 2, 16, 64, generator=g).half()
    assert ((q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504)
    ref = attention(q, k, v, backend="math", scale=1.0)
    out = attention(q, k, v, backend="sdpa", scale=1.0, upcast=True)
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() < 2e-3
