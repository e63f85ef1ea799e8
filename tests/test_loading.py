"""Loading through the real code paths: presets, save_pretrained folders, checkpoint files, hub ids."""
import json
import shutil

import pytest
import torch

from fastsd import ModelLoadError, load_model, optimize
from fastsd.presets import PRESETS


def test_folder_round_trip_gives_the_same_images(tiny, tiny_folder):
    kw = dict(num_inference_steps=3, seed=2, progress=False)
    loaded = load_model(str(tiny_folder))
    assert loaded.source == "folder" and loaded.scheduler.__class__.__name__ == "PNDMScheduler"
    a = optimize(tiny).generate("a cat", **kw).latents
    b = optimize(loaded).generate("a cat", **kw).latents
    assert torch.equal(a, b)


def test_folder_scheduler_config_is_honoured_unless_overridden(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "EulerDiscreteScheduler"
    cfg_path.write_text(json.dumps(cfg))
    idx = json.loads((folder / "model_index.json").read_text())
    idx["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(idx))
    eng = optimize(load_model(str(folder)))
    assert eng.describe()["scheduler"] == "euler"
    a = eng.generate("a cat", num_inference_steps=3, seed=0, progress=False).latents
    b = eng.generate("a cat", num_inference_steps=3, seed=0, progress=False, scheduler="ddim").latents
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny") and n != "fastsd-shapes"])
def test_random_weights_builds_every_preset_at_published_size(name):
    with torch.device("meta"):
        counts = load_model(name, random_weights=True).parameter_counts()
    published_unet = {"sd-1.4": 859.52e6, "sd-1.5": 859.52e6, "small-sd": 579.38e6,
                      "sd-2.1": 865.91e6, "sd-2-base": 865.91e6,
                      # 9 input channels: conv_in gains 5 x 320 x 3 x 3 weights
                      "sd-1.5-inpainting": 859.54e6, "sd-2-inpainting": 865.93e6,
                      # 5 input channels (depth); the x4 upscaler's own UNet (473M) and 3-block VAE
                      "sd-2-depth": 865.91e6, "sd-x4-upscaler": 473.40e6}[name]
    assert abs(counts["unet"] - published_unet) < 0.01e6
    assert abs(counts["vae"] - (55.33e6 if name == "sd-x4-upscaler" else 83.65e6)) < 0.01e6


def test_random_weights_are_seeded():
    a = load_model("tiny", random_weights=True, seed=1).unet.conv_in.weight
    b = load_model("tiny", random_weights=True, seed=1).unet.conv_in.weight
    c = load_model("tiny", random_weights=True, seed=2).unet.conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a preset"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="--random-weights needs a preset"):
        load_model(str(tmp_path), random_weights=True)


def test_hub_id_that_is_not_cached_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("sd-1.5")
    with pytest.raises(ModelLoadError, match="someone/some-model"):
        load_model("someone/some-model")


def test_corrupt_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_model(str(bad))
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_model(str(other))


def test_pickles_need_allow_pickle_and_load_weights_only(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, str(ckpt))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(ckpt))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_model(str(ckpt), allow_pickle=True)  # read (weights only), then judged by its keys

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, str(evil))
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(str(evil), allow_pickle=True)
