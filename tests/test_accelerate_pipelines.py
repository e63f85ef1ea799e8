"""fastsd.accelerate on every diffusers pipeline class of the installed diffusers whose constructor takes a
UNet2DConditionModel and an AutoencoderKL: each class in the drop-in's scope is built from tiny components
(tests/pipeline_zoo.py), called plain, accelerated (`exact`) and called again (the same output, bit for bit,
through fastsd's path); each class out of scope (AnimateDiff's UNetMotionModel, diffusers' deprecated
pipelines) is refused with one clear error. A diffusers release that adds a class fails the first test
until the class is put on one side or the other."""
import inspect
import os
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsd  # first, as in the other tests: see unet_vae_pipelines
from fastsd import InvalidParameter
from fastsd.accelerate import DEPRECATED, accelerated

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel

from pipeline_zoo import PIPELINES, arrays, build, call, pndm, text_encoder, tokenizer, unet, vae

ROOT = Path(__file__).resolve().parents[1]
ANIMATEDIFF = {"AnimateDiffPipeline", "AnimateDiffControlNetPipeline", "AnimateDiffPAGPipeline",
               "AnimateDiffSDXLPipeline", "AnimateDiffSparseControlNetPipeline",
               "AnimateDiffVideoToVideoPipeline", "AnimateDiffVideoToVideoControlNetPipeline"}
BLIP = "BlipDiffusionControlNetPipeline"  # maintained, but built on BLIP-Diffusion's deprecated parts


def _takes(hint, cls) -> bool:
    return hint is cls or cls in getattr(hint, "__args__", ()) or (isinstance(hint, str) and cls.__name__ in hint)


def unet_vae_pipelines() -> set[str]:
    """The pipeline classes diffusers exports whose __init__ takes a UNet2DConditionModel and an AutoencoderKL."""
    # `python -m pytest` puts the repository root on sys.path, where fastsd's kernels/ folder would pass for
    # Hugging Face's `kernels` package that transformers and some pipelines look for when first imported:
    # import them without the root
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd(), str(ROOT))]
    try:
        return _unet_vae_pipelines()
    finally:
        sys.path[:] = saved


def _unet_vae_pipelines() -> set[str]:
    found = set()
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # a lazy import that fails here (AceStepPipeline: an optional package) is not offered
            continue
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            continue
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an annotation that does not resolve: take the raw ones
            hints = {k: p.annotation for k, p in inspect.signature(cls.__init__).parameters.items()}
        if _takes(hints.get("unet"), UNet2DConditionModel) and _takes(hints.get("vae"), AutoencoderKL):
            found.add(name)
    return found


FOUND = unet_vae_pipelines()
DEPRECATED_CLASSES = sorted(n for n in FOUND if getattr(diffusers, n).__module__.startswith(DEPRECATED))


def test_every_class_is_built_here_or_refused():
    assert len(FOUND) >= 60
    in_scope = set(PIPELINES)
    assert not in_scope & (ANIMATEDIFF | set(DEPRECATED_CLASSES) | {BLIP})
    assert FOUND == in_scope | ANIMATEDIFF | set(DEPRECATED_CLASSES) | {BLIP}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_exact_gives_diffusers_output_on_every_pipeline_in_scope(name):
    pipe = build(name)
    ref = arrays(call(pipe, name))
    assert ref, "the call returned no arrays to compare"
    fastsd.accelerate(pipe, profile="exact", device="cpu")
    out = arrays(call(pipe, name))
    assert ref.keys() == out.keys()
    for k in ref:
        assert ref[k].shape == out[k].shape and np.array_equal(ref[k], out[k]), k
    state = accelerated(pipe)
    assert state.calls["torch"] >= 1 and state.calls["plain"] == 0  # the UNet ran in fastsd's compute copy
    assert sum(n for (what, path), n in state.routes.items() if what == "VAE") >= 1


def _refused(pipe, match: str) -> None:
    with pytest.raises(InvalidParameter, match=f"pipe: .*{match}.*maintained diffusers pipeline"):
        fastsd.accelerate(pipe)
    assert accelerated(pipe) is None


def test_animatediff_is_refused():
    """AnimateDiff turns the UNet into a UNetMotionModel; the other AnimateDiff classes are given that UNet
    without their own constructors (which need motion or sparse ControlNet adapters)."""
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_norm_num_groups=16, motion_num_attention_heads=2)
    pipe = diffusers.AnimateDiffPipeline(vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(), unet=unet(),
                                         motion_adapter=adapter, scheduler=pndm())
    _refused(pipe, "its unet is a UNetMotionModel")
    for name in sorted(ANIMATEDIFF - {"AnimateDiffPipeline"}):
        cls = getattr(diffusers, name)
        other = cls.__new__(cls)
        object.__setattr__(other, "unet", pipe.unet)
        object.__setattr__(other, "vae", pipe.vae)
        _refused(other, "UNetMotionModel")


@pytest.mark.parametrize("name", DEPRECATED_CLASSES)
def test_deprecated_pipelines_are_refused(name):
    cls = getattr(diffusers, name)
    _refused(cls.__new__(cls), "deprecated by diffusers")  # the class decides: no need to build one


def test_blip_diffusion_controlnet_is_refused():
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    qformer = Blip2QFormerModel(Blip2Config(
        vision_config={**small, "image_size": 224, "patch_size": 14}, num_query_tokens=16,
        qformer_config={**small, "vocab_size": 1000, "max_position_embeddings": 512, "cross_attention_frequency": 1,
                        "encoder_hidden_size": 16}))
    text = ContextCLIPTextModel(CLIPTextConfig(**small, vocab_size=1000, projection_dim=16, max_position_embeddings=77))
    controlnet = diffusers.ControlNetModel(in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16,
                                           conditioning_embedding_out_channels=(16, 16, 16, 16))
    pipe = diffusers.BlipDiffusionControlNetPipeline(tokenizer=tokenizer(), text_encoder=text, vae=vae(), unet=unet(),
                                                     scheduler=pndm(), qformer=qformer, controlnet=controlnet,
                                                     image_processor=BlipImageProcessor())
    _refused(pipe, "qformer, text_encoder from diffusers' deprecated pipelines")
