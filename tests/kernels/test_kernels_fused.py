"""Fused GroupNorm+SiLU and GEGLU: Triton kernels (interpreted) vs torch, torch fallbacks vs diffusers,
and apply_fused_ops on the tiny UNet / VAE."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_triton, unet_out, vae_out

# Max abs error vs the fp32 torch result on the same (rounded) inputs, measured under TRITON_INTERPRET=1
# over the shapes below (outputs up to ~10 in magnitude: x ~ 3*N(0,1)+1, weight/bias ~ N(0,1)):
#   groupnorm_silu fp32 1.4e-6; fp16 3.1e-3 (torch's own fp16 group_norm+silu: 4.7e-3);
#                  bf16 4.9e-2 (torch bf16: 3.2e-2; 1 bf16 ulp in [4, 8) is 3.1e-2)
#   geglu          fp32 9.5e-7; fp16 2.0e-3 (torch fp16: 3.0e-3); bf16 2.8e-2 (torch bf16: 2.6e-2)
# Tolerances: fp32 1e-5 absolute; fp16 1e-2 absolute; bf16 6e-2 + 1e-2 relative.
TOL = {torch.float32: (1e-5, 0.0), torch.float16: (1e-2, 0.0), torch.bfloat16: (6e-2, 1e-2)}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def _assert_close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    err = (out.float() - ref).abs()
    bound = atol + rtol * ref.abs()
    assert (err <= bound).all(), f"max abs error {err.max().item():.3g} ({dtype})"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape,groups", [((1, 32, 8, 8), 8), ((2, 24, 5, 7), 4), ((1, 16, 33), 16),
                                          ((3, 12, 5, 5), 4), ((1, 8, 64, 72), 2)],
                         ids=["nchw", "odd-hw", "3d", "partial-rows", "multi-block"])
def test_groupnorm_silu_triton_vs_torch(shape, groups, dtype):
    from fastsd.kernels import groupnorm_silu

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = torch.randn(shape[1], generator=g).to(dtype)
    b = torch.randn(shape[1], generator=g).to(dtype)
    out = groupnorm_silu(x, groups, w, b, 1e-5, impl="triton")
    ref = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5))
    assert out.dtype == dtype and out.shape == x.shape
    _assert_close(out, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,groups", [((2, 32, 6, 5), 8), ((1, 40, 4, 4), 4)], ids=["sd-like", "cpg10"])
def test_groupnorm_silu_triton_channels_last(shape, groups, dtype, monkeypatch):
    """A channels_last UNet keeps the kernel: read in NHWC, written in NHWC, same numbers as torch."""
    from fastsd.kernels import groupnorm_silu, triton_norm

    launched = []
    kernel = triton_norm.groupnorm_silu
    monkeypatch.setattr(triton_norm, "groupnorm_silu", lambda x, *a, **k: launched.append(x) or kernel(x, *a, **k))

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g).to(dtype)
    b = torch.randn(shape[1], generator=g).to(dtype)
    assert not x.is_contiguous()
    out = groupnorm_silu(x, groups, w, b, 1e-5, impl="triton")
    ref = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5))
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    assert any(t is x for t in launched)  # the kernel ran on it (channels_last used to go to torch)
    _assert_close(out, ref, dtype)
    strided = x.permute(0, 1, 3, 2)  # neither layout: made contiguous first
    _assert_close(groupnorm_silu(strided, groups, w, b, 1e-5, impl="triton"),
                  F.silu(F.group_norm(strided.float(), groups, w.float(), b.float(), 1e-5)), dtype)


@needs_triton
def test_groupnorm_silu_gpu_launch_plans_run_in_the_interpreter():
    """The plans launch_plan picks on a GPU (one row per program, several rows per program) give the same
    numbers when run, here through the interpreter."""
    from fastsd.kernels.triton_norm import LaunchPlan, groupnorm_silu, launch_plan

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 16, 8, 8, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ref = F.silu(F.group_norm(x, 8, w, b, 1e-5))
    plans = {launch_plan(32, 128, 132), launch_plan(32, 128, 1), LaunchPlan(4, 128, 4, 8)}
    assert {p.rows for p in plans} == {1, 4, 8}
    for plan in plans:
        assert (groupnorm_silu(x, 8, w, b, 1e-5, plan=plan) - ref).abs().max().item() < 1e-5, plan


def test_groupnorm_launch_plan_per_shape():
    """N * G one-row programs was too fine for a large batch, and packing by group size alone left SMs idle
    for one sample: the grid follows the shape and the GPU's SM count."""
    pytest.importorskip("triton")
    from fastsd.kernels.triton_norm import MAX_TILE, PROGRAMS_PER_SM, launch_plan

    sms = 132
    for n in (1, 2, 8, 32, 128, 512):
        for group_size in (160, 2560, 10240, 40960, 163840, 4 * 2**20):  # SD UNet/VAE levels, 512-1024 px
            rows = n * 32
            plan = launch_plan(rows, group_size, sms)
            assert plan.rows * plan.block <= MAX_TILE and plan.block >= min(group_size, 128)
            assert plan.programs == -(-rows // plan.rows)
            assert plan.programs >= min(rows, PROGRAMS_PER_SM * sms) // 2  # never starves the GPU
            if rows >= 4 * PROGRAMS_PER_SM * sms and group_size <= 2048:
                assert plan.programs < rows // 2  # packs a large batch of small groups
    assert launch_plan(32, 256, sms).programs == 32  # one sample: one group per program
    assert launch_plan(128 * 32, 2560, sms).rows == 4


@needs_triton
def test_groupnorm_silu_triton_no_affine_and_large_mean():
    # A large common offset: the kernel's two-pass variance must not cancel.
    from fastsd.kernels import groupnorm_silu

    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(1)) + 1000.0
    out = groupnorm_silu(x, 4, None, None, 1e-6, impl="triton")
    ref = F.silu(F.group_norm(x.double(), 4, None, None, 1e-6)).float()
    assert (out - ref).abs().max().item() < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 77, 2 * 160), (3, 5, 2 * 40)], ids=["64", "77x160", "odd"])
def test_geglu_triton_vs_torch(shape, dtype):
    from fastsd.kernels import geglu

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = geglu(x, impl="triton")
    a, gate = x.float().chunk(2, -1)
    ref = a * F.gelu(gate)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_fallbacks_bit_identical_to_diffusers_math(dtype):
    from fastsd.kernels import geglu, groupnorm_silu

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 8, 8, generator=g).to(dtype)
    w, b = torch.randn(32, generator=g).to(dtype), torch.randn(32, generator=g).to(dtype)
    assert torch.equal(groupnorm_silu(x, 8, w, b, 1e-6, impl="torch"), F.silu(F.group_norm(x, 8, w, b, 1e-6)))
    y = torch.randn(2, 10, 64, generator=g).to(dtype)
    h, gate = y.chunk(2, -1)
    assert torch.equal(geglu(y, impl="torch"), h * F.gelu(gate))


def test_auto_impl_on_cpu_is_torch():
    from fastsd.kernels.fused import _resolve_impl

    # even with the interpreter available, 'auto' never runs interpreted kernels
    assert _resolve_impl("groupnorm_silu", "auto", "cpu", torch.float32) == "torch"
    assert _resolve_impl("geglu", "auto", "cpu", torch.float16) == "torch"


def test_fused_op_available_reports_reason(monkeypatch):
    from fastsd.kernels import fused_op_available

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = fused_op_available("groupnorm_silu", "cpu", torch.float32)
    assert not ok and ("CPU backend" in reason or "not installed" in reason)
    with pytest.raises(ValueError, match="unknown fused op"):
        fused_op_available("layernorm", "cpu", torch.float32)



def test_apply_fused_ops_cpu_exact(unet, vae, unet_inputs, vae_latents):
    from fastsd.kernels import apply_fused_ops, install_attention, remove_fused_ops

    ref_u, ref_v = unet_out(unet, unet_inputs), vae_out(vae, vae_latents)
    install_attention([unet, vae], "sdpa")
    applied = apply_fused_ops(unet, vae, "cpu", torch.float32)
    assert applied == ["groupnorm_silu", "geglu"]  # fuse_qkv: not on CPU (neutral time, more memory)
    names = {type(m).__name__ for m in unet.modules()} | {type(m).__name__ for m in vae.modules()}
    assert {"FusedResnetBlock2D", "FusedGEGLU", "FusedGroupNormSiLU"} <= names
    assert "ResnetBlock2D" not in names and "GEGLU" not in names
    assert not getattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "fused_projections", False)
    out_u, out_v = unet_out(unet, unet_inputs), vae_out(vae, vae_latents)
    # the torch fallbacks are the same ops: bit-identical
    assert torch.equal(out_u, ref_u) and torch.equal(out_v, ref_v)
    remove_fused_ops(unet, vae)
    names = {type(m).__name__ for m in unet.modules()}
    assert "FusedResnetBlock2D" not in names and "ResnetBlock2D" in names
    assert torch.equal(unet_out(unet, unet_inputs), ref_u)


def test_fuse_projections_keeps_our_processor(unet, vae, unet_inputs, vae_latents):
    from fastsd.kernels import fuse_projections, install_attention

    ref_u, ref_v = unet_out(unet, unet_inputs), vae_out(vae, vae_latents)
    install_attention([unet, vae], "sdpa")
    assert fuse_projections(unet) == (True, "fused") and fuse_projections(vae)[0]
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.fused_projections and hasattr(block.attn1, "to_qkv") and hasattr(block.attn2, "to_kv")
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FastSDAttnProcessor"}
    # same weights in one GEMM (measured: 0.0 difference here; GEMM blocking may differ elsewhere)
    assert (unet_out(unet, unet_inputs) - ref_u).abs().max().item() < 1e-5
    assert (vae_out(vae, vae_latents) - ref_v).abs().max().item() < 1e-5
    assert fuse_projections(unet) == (True, "already fused")


def test_apply_fused_ops_flags_and_foreign_processor(unet):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from fastsd.kernels import apply_fused_ops, fuse_projections

    assert apply_fused_ops(unet, None, "cpu", torch.float32, groupnorm_silu=False, geglu=False,
                           fuse_qkv=False) == []
    unet.set_attention_slice(1)  # diffusers' SlicedAttnProcessor ignores fused weights: leave unfused
    ok, why = fuse_projections(unet)
    assert not ok and "SlicedAttnProcessor" in why
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_apply_fused_triton_interpreted_tiny_unet(unet, unet_inputs, monkeypatch, channels_last):
    # Force the interpreted Triton kernels into the tiny UNet (auto would pick torch on CPU).
    from fastsd.kernels import apply_fused_ops, fused, triton_norm

    ref = unet_out(unet, unet_inputs)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    layouts = []
    kernel = triton_norm.groupnorm_silu
    monkeypatch.setattr(triton_norm, "groupnorm_silu",
                        lambda x, *a, **k: layouts.append(triton_norm.layout(x)) or kernel(x, *a, **k))
    monkeypatch.setattr(fused, "_resolve_impl", lambda op, impl, device, dtype: "triton")
    assert apply_fused_ops(unet, None, "cpu", torch.float32, fuse_qkv=False) == ["groupnorm_silu", "geglu"]
    assert unet.mid_block.resnets[0]._fastsd_impl == "triton"
    # measured 1.1e-6
    assert (unet_out(unet, unet_inputs) - ref).abs().max().item() < 5e-5
    assert layouts and ("nhwc" in layouts) == channels_last  # every norm+SiLU went through the kernel


@needs_triton
def test_apply_fused_triton_interpreted_tiny_vae(vae, vae_latents, monkeypatch):
    # Covers the VAE's "group" mid-block resnets and the encoder/decoder conv_norm_out + conv_act.
    from fastsd.kernels import apply_fused_ops, fused

    ref = vae_out(vae, vae_latents)
    monkeypatch.setattr(fused, "_resolve_impl", lambda op, impl, device, dtype: "triton")
    assert apply_fused_ops(None, vae, "cpu", torch.float32, fuse_qkv=False) == ["groupnorm_silu"]
    # measured 4.8e-6 (outputs up to 3.0)
    assert (vae_out(vae, vae_latents) - ref).abs().max().item() < 5e-5
