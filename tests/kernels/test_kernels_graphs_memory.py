"""CUDA graph cache logic (with an injected CPU capture function), memory planning, check_finite."""

import pytest
import torch

from fastsd.kernels import (
    CUDAGraphRunner,
    MemoryPlan,
    NonFiniteError,
    apply_memory_plan,
    check_finite,
    cuda_graphs_available,
    install_attention,
    installed_processors,
    plan_memory,
)
from fastsd.kernels.cuda_graphs import CapturedGraph

# -- CUDA graphs -----------------------------------------------------------------------------------


def fake_capture(log):
    """CPU stand-in for capture_cuda_graph with the same contract: static inputs that replay() reads."""
    def capture(fn, example_inputs):
        static = tuple(t.clone() for t in example_inputs)
        out = fn(*static)
        log.append(tuple(static[0].shape))

        def replay():
            out.copy_(fn(*static))

        return CapturedGraph(static, replay, out)

    return capture


def unet_fn(sample, t, ehs):
    return sample * t.view(-1, 1, 1, 1) + ehs.mean()


def _inputs(b, h, w, t=1.0, dtype=torch.float32):
    return torch.randn(b, 4, h, w, dtype=dtype), torch.tensor(t), torch.randn(b, 77, 8, dtype=dtype)


def test_cuda_graphs_unavailable_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ok, reason = cuda_graphs_available()
    assert not ok and "CUDA" in reason and "is_available() is False" in reason
    ok, reason = cuda_graphs_available("cpu")
    assert not ok and "cpu" in reason
    with pytest.raises(RuntimeError, match="CUDAGraphRunner unavailable"):
        CUDAGraphRunner(unet_fn)


def test_graph_cache_recaptures_on_new_shape_and_replays_with_new_inputs():
    log = []
    runner = CUDAGraphRunner(unet_fn, capture_fn=fake_capture(log))
    s, t, e = _inputs(2, 8, 8, t=3.0)
    assert torch.allclose(runner(s, t, e), unet_fn(s, t.expand(2), e))
    s2, t2, e2 = _inputs(2, 8, 8, t=5.0)  # same shape: replay with the new values, no new capture
    assert torch.allclose(runner(s2, t2, e2), unet_fn(s2, t2.expand(2), e2))
    assert runner.captures == 1 and runner.replays == 2
    s3, t3, e3 = _inputs(1, 8, 12)  # new batch and width: a new graph, not a failure
    assert torch.allclose(runner(s3, t3, e3), unet_fn(s3, t3.expand(1), e3))
    assert runner.captures == 2 and log == [(2, 4, 8, 8), (1, 4, 8, 12)]
    assert runner.cached_keys()[0][:4] == (2, 8, 8, torch.float32)


def test_graph_cache_lru_bound_and_order():
    log = []
    runner = CUDAGraphRunner(unet_fn, max_graphs=2, capture_fn=fake_capture(log))
    a, b, c = _inputs(1, 8, 8), _inputs(2, 8, 8), _inputs(1, 16, 16)
    runner(*a)
    runner(*b)
    runner(*a)  # a is now most recently used
    runner(*c)  # evicts b
    keys = [k[:3] for k in runner.cached_keys()]
    assert keys == [(1, 8, 8), (1, 16, 16)]
    assert runner.evictions == 1 and runner.captures == 3
    runner(*b)  # b again: recaptured
    assert runner.captures == 4 and len(runner.cached_keys()) == 2


def test_graph_cache_keys_dtype_and_clones_output():
    runner = CUDAGraphRunner(unet_fn, capture_fn=fake_capture([]))
    out1 = runner(*_inputs(1, 8, 8, t=1.0))
    runner(*_inputs(1, 8, 8, t=2.0))
    assert runner.captures == 1
    out1_before = out1.clone()
    runner(*_inputs(1, 8, 8, t=7.0))
    assert torch.equal(out1, out1_before)  # the returned tensor is not the static buffer
    runner(*_inputs(1, 8, 8, dtype=torch.float64))
    assert runner.captures == 2


def test_graph_runner_rejects_bad_size():
    with pytest.raises(ValueError):
        CUDAGraphRunner(unet_fn, max_graphs=0, capture_fn=fake_capture([]))


# -- memory planning --------------------------------------------------------------------------------

SD15_UNET = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "mid_block_type": "UNetMidBlock2DCrossAttn"}
SD21_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20]}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "sample_size": 512}
GiB = 2**30


def test_plan_fits_without_slicing():
    plan = plan_memory(SD15_UNET, SD_VAE, 1, 512, 512, torch.float16, "cpu", budget_bytes=64 * GiB)
    assert isinstance(plan, MemoryPlan)
    assert plan.attention_slicing is False and plan.vae_tiling is False
    # 2 (CFG) x 8 heads x 4096^2 scores, fp32 (upcast on for fp16), scores + probs
    assert plan.unet_attention_bytes == 2 * 8 * 4096**2 * 4 * 2
    assert 0 < plan.estimated_peak_bytes < 64 * GiB and "fit" in plan.reason


def test_plan_slices_and_tiles_when_tight():
    # SD 2.1 at 1024x1024: 16384 tokens, one (batch*head) row of fp32 scores + probs is 2 GiB;
    # the VAE decode estimate is 2.5 GiB.
    plan = plan_memory(SD21_UNET, SD_VAE, 1, 1024, 1024, torch.float16, "cpu", budget_bytes=6 * GiB)
    assert plan.attention_slicing == 2  # (6 GiB - other activations) // 2 GiB, <= 5 (min heads of SD 2.1)
    assert plan.vae_tiling is False and plan.estimated_peak_bytes <= 6 * GiB
    plan = plan_memory(SD21_UNET, SD_VAE, 1, 1024, 1024, torch.float16, "cpu", budget_bytes=int(2.4 * GiB))
    assert plan.attention_slicing == 1 and plan.vae_tiling is True
    assert "slicing" in plan.reason and "tiling" in plan.reason
    assert plan.estimated_peak_bytes <= 2.4 * GiB
    tight = plan_memory(SD21_UNET, SD_VAE, 1, 1024, 1024, torch.float16, "cpu", budget_bytes=2 * GiB)
    assert tight.attention_slicing == 1 and "may not fit" in tight.reason


def test_plan_flash_backend_needs_no_slicing():
    plan = plan_memory(SD15_UNET, SD_VAE, 1, 768, 768, torch.float16, "cpu", budget_bytes=4 * GiB,
                       flash_backend=True)
    assert plan.attention_slicing is False


def test_plan_reads_free_memory_by_default():
    from fastsd.kernels import available_memory_bytes

    free, source = available_memory_bytes("cpu")
    assert free > 0 and ("MemAvailable" in source or "RAM" in source)
    plan = plan_memory(SD15_UNET, SD_VAE, 1, 64, 64, torch.float32, "cpu")
    assert plan.budget_bytes > 0 and plan.attention_slicing is False


def test_apply_memory_plan_keeps_our_processor(unet, vae, unet_inputs):
    sample, t, ehs = unet_inputs
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=ehs).sample
    install_attention([unet, vae], "sdpa")
    plan = MemoryPlan(attention_slicing=1, vae_tiling=True, estimated_peak_bytes=0, reason="test")
    done = apply_memory_plan(unet, vae, plan)
    assert done == ["attention slicing 1 (FastSDAttnProcessor)", "vae tiling"]
    (p,) = installed_processors(unet)
    assert p.slice_size == 1 and installed_processors(vae)[0].slice_size is None
    assert vae.use_tiling
    with torch.no_grad():
        assert (unet(sample, t, encoder_hidden_states=ehs).sample - ref).abs().max() < 1e-5


def test_apply_memory_plan_uses_diffusers_slicing_otherwise(unet):
    plan = MemoryPlan(attention_slicing=True, vae_tiling=False, estimated_peak_bytes=0, reason="test")
    assert apply_memory_plan(unet, None, plan) == ["attention slicing auto (diffusers)"]
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    # no slicing in the plan: processors left alone
    apply_memory_plan(unet, None, MemoryPlan(False, False, 0, "test"))
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SlicedAttnProcessor"}


# -- check_finite ------------------------------------------------------------------------------------


def test_check_finite():
    x = torch.ones(3, dtype=torch.float16)
    assert check_finite(x, "latents") is x
    x[1] = float("inf")
    x[2] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        check_finite(x, "latents after step 3")
    msg = str(info.value)
    assert "latents after step 3" in msg and "1 NaN and 1 inf" in msg and "fp32" in msg and "upcast" in msg
    with pytest.raises(NonFiniteError, match="not an fp16 overflow"):
        check_finite(torch.tensor([float("nan")]), "decoded image")
    assert check_finite(torch.tensor([1, 2]), "ints") is not None
