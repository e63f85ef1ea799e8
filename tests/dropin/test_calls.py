"""Where each call of an accelerated module goes: what only the user's own module can run (diffusers' hooks:
layerwise casting, layer skipping; torch forward hooks; gradients to its parameters) runs there, untouched,
with one logged reason, and gives diffusers' result; everything else runs fastsd's compute copy."""
import logging

import numpy as np
import pytest
import torch

import fastsd
from fastsd.accelerate import accelerated

from accelerate_pipes import make_pipe, run, tiny_parts


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def reasons(caplog) -> list[str]:
    return [r.message for r in caplog.records if "runs as the user's module" in r.message]


@pytest.mark.parametrize("when", ["before", "after"])
def test_layerwise_casting_runs_the_users_module(parts, caplog, when):
    """enable_layerwise_casting (float8 storage, fp32 compute) before or after accelerate: diffusers' hooks
    cast each layer's weights at its call; the UNet runs as the user's module, the VAE (no hooks) in fastsd's
    copy; the same images as plain diffusers."""
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    casting = dict(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    if when == "after":
        fastsd.accelerate(pipe, profile="exact", device="cpu")
    for p in (plain, pipe):
        p.unet.enable_layerwise_casting(**casting)
    if when == "before":
        fastsd.accelerate(pipe, profile="exact", device="cpu")
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    assert np.array_equal(a, b)
    state = accelerated(pipe)
    assert state.calls["plain"] >= 2 and state.calls["torch"] == 0 and state.routes[("VAE", "torch")] == 1
    assert len(reasons(caplog)) == 1 and "layerwise_casting" in reasons(caplog)[0]
    fastsd.deaccelerate(pipe)
    c, _ = run(pipe, "txt2img")
    assert np.array_equal(a, c)


def test_layer_skipping_and_forward_hooks_run_the_users_module(parts, caplog):
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    base, _ = run(pipe, "txt2img")
    for p in (plain, pipe):
        apply_layer_skip(p.unet, LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks",
                                                 skip_attention=True))
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        a, _ = run(plain, "txt2img")
        b, _ = run(pipe, "txt2img")
    state = accelerated(pipe)
    assert np.abs(a - b).max() * 255 <= 10 and np.abs(base - b).max() * 255 > 10  # UNet as plain; VAE in bf16
    assert state.calls["plain"] >= 2 and any("layer_skip" in r for r in reasons(caplog))
    # a torch forward hook the user registers sees the user's own submodule run
    pipe = make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe)
    seen = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    b, _ = run(pipe, "txt2img")
    assert len(seen) >= 2 and accelerated(pipe).calls["plain"] == len(seen)
    handle.remove()
    run(pipe, "txt2img")
    assert accelerated(pipe).calls["torch"] >= 2 and len(seen) == accelerated(pipe).calls["plain"]


def test_gradients_reach_the_users_parameters(parts):
    """Outside no_grad, with parameters that require grad, the call runs the user's module so that
    backward() fills their .grad; under no_grad it runs the copy."""
    pipe = make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe, dtype="bf16", device="cpu")
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    out = pipe.unet(sample, 10, hidden).sample
    out.float().pow(2).mean().backward()
    assert pipe.unet.conv_in.weight.grad is not None and accelerated(pipe).calls["plain"] == 1
    with torch.no_grad():
        assert pipe.unet(sample, 10, hidden).sample.dtype == torch.float32
    assert accelerated(pipe).calls["torch"] == 1


def test_a_hook_that_wrapped_fastsds_forward_keeps_working(parts):
    """A diffusers hook registered on the UNet after accelerate wraps the accelerated forward: the call runs
    the user's module with the hook; after deaccelerate the hook stays and the forward it wrapped calls the
    user's module."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Halve(ModelHook):
        def post_forward(self, module, output):  # the pipeline calls with return_dict=False: a tuple
            return (output[0] * 0.5, *output[1:])
    plain, pipe = make_pipe(parts, "txt2img"), make_pipe(parts, "txt2img")
    fastsd.accelerate(pipe)
    for p in (plain, pipe):
        HookRegistry.check_if_exists_or_initialize(p.unet).register_hook(Halve(), "halve")
    a, _ = run(plain, "txt2img")
    b, _ = run(pipe, "txt2img")
    assert np.array_equal(a, b) and accelerated(pipe).calls["plain"] >= 2
    fastsd.deaccelerate(pipe)
    assert "forward" in pipe.unet.__dict__  # the hook's
    b, _ = run(pipe, "txt2img")
    assert np.array_equal(a, b)
    HookRegistry.check_if_exists_or_initialize(pipe.unet).remove_hook("halve")
    c, _ = run(pipe, "txt2img")
    assert np.array_equal(c, run(make_pipe(parts, "txt2img"), "txt2img")[0])
