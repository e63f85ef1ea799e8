"""training/train_lcm_lora.py's differentiable sampler (`Setup.sample`, what `--unroll-n` trains through) is the
sampler users run: from the same start noise and generator, its LCM and TCD (eta 0) outputs equal the latents of
diffusers' pipeline with LCMScheduler / TCDScheduler at 4 steps, guidance 1, on the embedded model."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    sys.path.insert(0, str(ROOT / "training"))
    spec = importlib.util.spec_from_file_location("train_lcm_lora", ROOT / "training" / "train_lcm_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_unrolled_sampler_equals_diffusers_pipeline(sampler):
    from diffusers import LCMScheduler, StableDiffusionPipeline, TCDScheduler
    train = _script()
    pipe = StableDiffusionPipeline.from_pretrained(train.BASE, safety_checker=None, requires_safety_checker=False)
    cls = LCMScheduler if sampler == "lcm" else TCDScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    prompt = "a small red circle at the top on a blue background"
    ref = pipe(prompt, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    setup = train.Setup(argparse.Namespace(ddim_steps=50, visit_steps=[], unroll_steps=4))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(ref.shape, generator=g)  # the pipeline's start noise, drawn first from its generator
    with torch.no_grad():
        cond = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        out = setup.sample(pipe.unet, x, cond, g, sampler)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max().item()
    # and it is differentiable: the loss the training adds reaches the UNet's weights
    w = next(pipe.unet.parameters())
    w.requires_grad_(True)
    setup.sample(pipe.unet, x, cond, torch.Generator().manual_seed(0), sampler).square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
