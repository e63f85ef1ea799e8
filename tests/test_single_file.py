"""Single-file checkpoints in the original LDM layout."""
import pytest
import torch
from safetensors.torch import save_file

from fastsd import load_model, optimize
from fastsd.single_file import detect_preset

from ldm_layout import to_ldm_checkpoint


def test_single_safetensors_file_loads_the_same_weights(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm_checkpoint(tiny), str(path))
    loaded = load_model(str(path), config="tiny")
    assert loaded.source == "single-file"
    for a, b in [(tiny.unet, loaded.unet), (tiny.vae, loaded.vae), (tiny.text_encoder, loaded.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    kw = dict(num_inference_steps=2, seed=0, progress=False)
    assert torch.equal(optimize(tiny).generate("a cat", **kw).latents, optimize(loaded).generate("a cat", **kw).latents)


@pytest.mark.parametrize("preset", ["sd-1.5", "sd-2-base", "small-sd"])
def test_architecture_is_detected_from_the_weights(preset):
    with torch.device("meta"):  # shapes only
        sd = to_ldm_checkpoint(load_model(preset, random_weights=True, safety_checker=False))
    assert detect_preset(sd) == preset


def test_wrong_architecture_names_the_preset(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm_checkpoint(tiny), str(path))
    from fastsd import ModelLoadError
    with pytest.raises(ModelLoadError, match="does not match the sd-1.5 architecture"):
        load_model(str(path))  # detected as SD 1.x by its keys, but the shapes are the tiny model's
