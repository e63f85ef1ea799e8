"""Step caching (DeepCache-style): the shallow step is exact on the step it was cached from, the schedule
of full and shallow steps, the engine and verify per interval, and one-line errors."""
import copy
import json

import pytest
import torch

from fastsd import optimize
from fastsd.cli import main
from fastsd.errors import InvalidParameter
from fastsd.optimize import OptimizeConfig
from fastsd.step_cache import StepCache, check_interval


def _two_layer_unet():
    """A small UNet with SD's layout (2 layers per block, cross-attention at every level), so the cached
    feature is taken inside the last up block (as on SD 1.x/2.x), not at its entry as on `tiny`."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()


@pytest.mark.parametrize("which", ["tiny", "two-layer"])
def test_shallow_step_on_its_own_cached_feature_is_exact(tiny, which):
    unet = tiny.unet if which == "tiny" else _two_layer_unet()
    sc = StepCache(unet, 3)
    assert sc.entry == len(unet.up_blocks[-1].resnets) - 2
    x = torch.randn(2, 4, 8, 8)
    h = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        full = sc(x, 500, h)
        shallow = sc(x, 500, h)  # the second call of the cycle: shallow layers only, over the cached feature
        moved = sc(x * 1.05, 480, h)
        ref = unet(x * 1.05, 480, encoder_hidden_states=h).sample
    assert sc.full_calls == 1
    assert torch.equal(full, shallow)
    err = (moved - ref).abs().max()
    assert 0 < err < ref.abs().max()  # an approximation, not the full step


def test_full_every_nth_call_reset_and_shape_change(tiny):
    sc = StepCache(tiny.unet, 2)
    x, h = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.inference_mode():
        for _ in range(5):
            sc(x, 10, h)
        assert sc.full_calls == 3  # calls 1, 3, 5
        sc(torch.randn(2, 4, 16, 16), 10, h)  # a new size cannot use the cached feature
        assert sc.full_calls == 4
        sc.reset()
        sc(x, 10, h)
        assert sc.full_calls == 5


def test_engine_interval_1_is_unchanged_and_3_moves_little(tiny):
    kw = dict(num_inference_steps=12, seed=0, progress=False, output_type="np")
    plain = optimize(copy.deepcopy(tiny), device="cpu").generate("a cat", **kw).images
    one = optimize(copy.deepcopy(tiny), device="cpu", cache_interval=1)
    assert one.backend.step_cache is None
    cached = optimize(tiny, device="cpu", cache_interval=3)
    img = cached.generate("a cat", **kw).images
    sc = cached.backend.step_cache
    assert sc.full_calls == 5  # 13 PNDM calls: 1, 4, 7, 10, 13
    assert "step_cache(interval 3)" in cached.describe()["applied"]
    assert 0 < abs(img - plain).mean() < 0.05


def test_verify_reports_each_interval(capsys, tmp_path):
    out = tmp_path / "v.json"
    code = main(["verify", "--model", "tiny", "--steps", "6", "--cache-interval", "1,3", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "step cache interval 3; tolerance (approximate (fastest))" in text
    runs = json.loads(out.read_text())["runs"]  # standard JSON: a bit-identical image has psnr_db null
    assert [r["config"]["cache_interval"] for r in runs] == [1, 3]
    assert runs[0]["tolerance"]["name"] == "fp32" and all(i["identical"] and i["psnr_db"] is None
                                                          for i in runs[0]["images"])
    assert runs[1]["tolerance"]["min_psnr"] == 20 and all(i["psnr_db"] >= 20 for i in runs[1]["images"])


@pytest.mark.parametrize("bad", [0, 51, "x", True, "2.5"])
def test_bad_interval_is_one_line(bad):
    with pytest.raises(InvalidParameter, match="cache_interval.*1..50"):
        check_interval(bad)


def test_interval_needs_the_eager_torch_backend(capsys):
    with pytest.raises(InvalidParameter, match="cache_interval.*eager torch"):
        OptimizeConfig(backend="onnxruntime", device="cpu", cache_interval=2).validated()
    with pytest.raises(InvalidParameter, match="cache_interval"):
        OptimizeConfig(device="cpu", compile=True, cache_interval=2).validated()
    code = main(["generate", "a cat", "--model", "tiny", "--cache-interval", "0", "--quiet"])
    assert code == 2 and "error: cache_interval: got '0'" in capsys.readouterr().err
