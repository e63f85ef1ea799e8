"""The CPU recipe that `dtype="bf16"` selects on the CPU (OptimizeConfig.cpu_recipe), on the tiny model."""
import torch

from fastsd import optimize
from fastsd.reference import TOLERANCES
from fastsd.verify import verify
from fastsd.optimize import OptimizeConfig


def _conv_weight(module):
    return next(m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d))


def test_bf16_on_cpu_uses_the_recipe(tiny):
    engine = optimize(tiny, dtype="bf16")
    b = engine.backend
    assert b.text_dtype == torch.float32 and next(b.text_encoder.parameters()).dtype == torch.float32
    assert next(b.unet_module.parameters()).dtype == torch.bfloat16
    assert next(b.vae.parameters()).dtype == torch.bfloat16
    assert _conv_weight(b.unet_module).is_contiguous(memory_format=torch.channels_last)
    assert _conv_weight(b.vae).is_contiguous(memory_format=torch.channels_last)
    d = engine.describe()
    assert d["text_encoder_dtype"] == "float32" and "channels_last" in d["applied"]


def test_recipe_off_is_plain_bf16(tiny):
    b = optimize(tiny, dtype="bf16", cpu_recipe=False).backend
    assert next(b.text_encoder.parameters()).dtype == torch.bfloat16
    assert not _conv_weight(b.vae).is_contiguous(memory_format=torch.channels_last)


def test_fp32_is_untouched(tiny):
    b = optimize(tiny).backend
    assert not b.cpu_recipe and b.applied == []
    assert next(b.unet_module.parameters()).dtype == torch.float32


def test_recipe_passes_verify(tiny):
    report, *_ = verify(tiny, OptimizeConfig(dtype="bf16"), steps=4, prompts=["a red circle"])
    assert report["passed"], report["images"]
    assert min(r["psnr_db"] for r in report["images"]) >= TOLERANCES["bf16"].min_psnr
