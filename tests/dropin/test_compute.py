"""The compute copy follows what the user does to their module through diffusers: attention-processor APIs
(set_default_attn_processor, set_attn_processor, attn_processors, a custom processor), FreeU, IP-Adapter,
PAG. Each against plain diffusers doing the same: exact (fp32) gives the same images; bf16 stays within
verify's bf16 tolerance and still runs fastsd's path (the compute copy, not the user's module)."""
import copy

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import fastsd
from fastsd.accelerate import accelerated
from fastsd.dropin.compute import compute_dtype, takes
from fastsd.kernels import FastSDAttnProcessor
from fastsd.reference import TOLERANCES, psnr

from accelerate_pipes import image_embeds, ip_adapter_state, make_pipe, run, tiny_parts

BF16_PSNR = TOLERANCES["bf16"].min_psnr


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def copy_of(pipe, role="unet"):
    return next(w.copy for w in accelerated(pipe).wrapped if w.role == role)


def kinds_of(module) -> set:
    return {type(p) for p in module.attn_processors.values()}


class Counting(AttnProcessor2_0):
    """A user's own processor (weightless): diffusers' maths, counting its calls."""
    calls = 0

    def __call__(self, *args, **kwargs):
        Counting.calls += 1
        return super().__call__(*args, **kwargs)


def test_compute_dtype_and_what_fastsd_attention_takes():
    assert compute_dtype(torch.bfloat16, torch.float32) == torch.bfloat16  # a profile lowers fp32
    assert compute_dtype(torch.bfloat16, torch.float16) == torch.float16  # never a user's half precision
    assert compute_dtype(torch.float32, torch.float16) == torch.float16
    assert takes(AttnProcessor2_0(), exact=True) and not takes(AttnProcessor(), exact=True)
    assert takes(AttnProcessor(), exact=False) and not takes(Counting(), exact=False)


@pytest.mark.parametrize("kind", ["txt2img", "controlnet"])
def test_attention_processor_apis_work_and_fastsd_steps_aside_for_the_users(parts, kind):
    """set_default_attn_processor / set_attn_processor / attn_processors on the accelerated UNet, ControlNet
    and VAE are diffusers' own; in fp32 the copy runs the user's processors (fastsd's kernel reproduces only
    AttnProcessor2_0 bit for bit), in bf16 fastsd's kernel takes AttnProcessor; deaccelerate and accelerate
    again keep the user's choice."""
    plain, pipe = make_pipe(parts, kind), make_pipe(parts, kind)
    fastsd.accelerate(pipe)
    for p in (plain, pipe):
        modules = [p.unet, p.vae] + ([p.controlnet] if kind == "controlnet" else [])
        for m in modules:
            m.set_default_attn_processor()
            assert kinds_of(m) == {AttnProcessor}
    a, _ = run(plain, kind)
    b, _ = run(pipe, kind)
    assert np.array_equal(a, b)
    assert kinds_of(copy_of(pipe).module) == {AttnProcessor} and accelerated(pipe).calls["torch"] > 0
    fastsd.deaccelerate(pipe)
    assert kinds_of(pipe.unet) == {AttnProcessor}
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    c, _ = run(pipe, kind)
    assert kinds_of(copy_of(pipe).module) == {FastSDAttnProcessor} and psnr(a * 255, c * 255) >= BF16_PSNR
    # a processor of the user's own: set on some modules, it runs there in the copy (fastsd steps aside)
    fastsd.accelerate(pipe)
    for p in (plain, pipe):
        p.unet.set_attn_processor({name: Counting() if "mid_block" in name else AttnProcessor2_0()
                                   for name in p.unet.attn_processors})
    a, _ = run(plain, kind)
    Counting.calls = 0
    b, _ = run(pipe, kind)
    assert np.array_equal(a, b) and Counting.calls > 0
    procs = copy_of(pipe).module.attn_processors
    assert all(isinstance(p, Counting) == ("mid_block" in n) for n, p in procs.items())
    assert {type(p) for n, p in procs.items() if "mid_block" not in n} == {FastSDAttnProcessor}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_freeu_is_honoured(parts, dtype):
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype=dtype, device="cpu")
    off, _ = run(plain, "txt2img")
    for p in (plain, pipe):
        p.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.abs(a - off).max() > 0.05  # FreeU changes the image
    if dtype == "fp32":
        assert np.array_equal(a, b)
    else:  # nearer FreeU's image than the image without it
        assert psnr(a * 255, b * 255) >= BF16_PSNR and np.abs(a - b).mean() < np.abs(off - b).mean() / 4
    assert copy_of(pipe).module.up_blocks[0].b1 == 1.5 and accelerated(pipe).calls["plain"] == 0
    for p in (plain, pipe):
        p.disable_freeu()
    b, _ = run(pipe, "txt2img")
    assert psnr(off * 255, b * 255) >= (BF16_PSNR if dtype == "bf16" else float("inf"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ip_adapter_is_honoured(parts, dtype):
    """IP-Adapter's processors hold weights: the copy takes them converted, with the image projection."""
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype=dtype, device="cpu")
    off, _ = run(plain, "txt2img")
    state = ip_adapter_state(parts["model"].unet)
    for p in (plain, pipe):
        p.unet._load_ip_adapter_weights([copy.deepcopy(state)])
    a, _ = run(plain, "txt2img", ip_adapter_image_embeds=image_embeds())
    b, _ = run(pipe, "txt2img", ip_adapter_image_embeds=image_embeds())
    assert np.abs(a - off).max() > 0.05
    if dtype == "fp32":
        assert np.array_equal(a, b)
    else:
        assert psnr(a * 255, b * 255) >= BF16_PSNR and np.abs(a - b).mean() < np.abs(off - b).mean() / 4
    unet = copy_of(pipe).module
    ip = [p for p in unet.attn_processors.values() if type(p).__name__ == "IPAdapterAttnProcessor2_0"]
    assert ip and ip[0].to_k_ip[0].weight.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    assert pipe.unet.dtype == torch.float32 and accelerated(pipe).calls["plain"] == 0
    for p in (plain, pipe):  # a scale the user sets on the processors reaches the copy's
        p.set_ip_adapter_scale(0.0)
    b, _ = run(pipe, "txt2img", ip_adapter_image_embeds=image_embeds())
    assert psnr(off * 255, b * 255) >= (BF16_PSNR if dtype == "bf16" else float("inf"))


def test_pag_is_honoured(parts):
    """StableDiffusionPAGPipeline sets its processors on the user's UNet for each call and puts the old ones
    back after: the copy follows both ways."""
    m = parts["model"]

    def pag():
        p = diffusers.StableDiffusionPAGPipeline(
            vae=copy.deepcopy(m.vae), text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=copy.deepcopy(m.unet),
            scheduler=copy.deepcopy(m.scheduler), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, pag_applied_layers=["mid"])
        p.set_progress_bar_config(disable=True)
        return p
    plain, pipe = pag(), pag()
    fastsd.accelerate(pipe)
    off, _ = run(plain, "txt2img", pag_scale=0.0)
    a, _ = run(plain, "txt2img", pag_scale=3.0)
    b, _ = run(pipe, "txt2img", pag_scale=3.0)
    assert np.abs(a - off).max() > 0.01 and np.array_equal(a, b) and accelerated(pipe).calls["torch"] > 0
    assert kinds_of(copy_of(pipe).module) != {FastSDAttnProcessor}  # PAG's processors ran in the copy
    run(pipe, "txt2img", pag_scale=0.0)
    assert kinds_of(copy_of(pipe).module) == {FastSDAttnProcessor}  # and fastsd's kernel is back after
