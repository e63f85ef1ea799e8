"""Every SD-family pipeline class loads from a folder diffusers saved, its kind told from the class and the
UNet's input channels; single checkpoint files are told apart by their UNet's input channels."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fastsd import ModelLoadError, load_model
from fastsd.loading import build_random
from fastsd.model_kinds import kind_of
from fastsd.presets import PRESETS
from fastsd.single_file import detect_preset

from ldm_layout import to_ldm_checkpoint


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def folders(tiny_folder, tiny_inpaint_folder, tiny_depth_folder, tiny_upscaler_folder, tmp_path_factory):
    out = {"StableDiffusionPipeline": ("tiny", tiny_folder, "sd"),
           "StableDiffusionInpaintPipeline": ("tiny-inpainting", tiny_inpaint_folder, "inpaint"),
           "StableDiffusionDepth2ImgPipeline": ("tiny-depth", tiny_depth_folder, "depth"),
           "StableDiffusionUpscalePipeline": ("tiny-upscaler", tiny_upscaler_folder, "upscale")}
    for task, cls in (("img2img", "StableDiffusionImg2ImgPipeline"), ("inpaint", "StableDiffusionInpaintPipeline-4")):
        path = tmp_path_factory.mktemp("models") / task
        build_random(PRESETS["tiny"]).to_pipeline(task=task).save_pretrained(path, safe_serialization=True)
        out[cls] = ("tiny", path, "sd")
    return out


@pytest.mark.parametrize("cls", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                 "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline-4",
                                 "StableDiffusionDepth2ImgPipeline", "StableDiffusionUpscalePipeline"])
def test_every_sd_pipeline_class_loads_from_its_folder(folders, cls):
    preset, path, kind = folders[cls]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == cls.split("-")[0]
    loaded, built = load_model(str(path)), build_random(PRESETS[preset], seed=0)
    assert loaded.kind == kind and loaded.source == "folder"
    for a, b in [(built.unet, loaded.unet), (built.vae, loaded.vae), (built.text_encoder, loaded.text_encoder)]:
        assert _same_weights(a, b)
    if kind == "depth":
        assert _same_weights(built.extra["depth_estimator"], loaded.extra["depth_estimator"])
        assert loaded.feature_extractor is None  # DPT's processor is not a safety checker's
        assert type(loaded.extra["depth_processor"]).__name__.startswith("DPTImageProcessor")
    if kind == "upscale":
        assert type(loaded.extra["low_res_scheduler"]).__name__ == "DDPMScheduler"
        assert loaded.extra["max_noise_level"] == 350
        assert type(loaded.to_pipeline()).__name__ == "StableDiffusionUpscalePipeline"


def test_a_class_that_disagrees_with_the_unet_is_refused(tiny_depth_folder, tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_depth_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionUpscalePipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="names StableDiffusionUpscalePipeline but its UNet takes 5 input "
                                             "channels.*StableDiffusionDepth2ImgPipeline"):
        load_model(str(folder))
    other = tmp_path / "xl"
    shutil.copytree(tiny_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="holds a StableDiffusionXLPipeline; fastsd loads the SD family"):
        load_model(str(other))


def test_kind_of_channels():
    assert [kind_of(c) for c in (4, 9, 5, 7)] == ["sd", "inpaint", "depth", "upscale"]
    with pytest.raises(ModelLoadError, match="takes 6 input channels"):
        kind_of(6)


@pytest.mark.parametrize("preset", ["sd-2-inpainting", "sd-1.5-inpainting", "sd-2-depth", "sd-x4-upscaler"])
def test_single_file_kind_is_detected_from_the_unet(preset):
    with torch.device("meta"):  # shapes only
        model = build_random(PRESETS[preset], with_safety_checker=False)
        sd = to_ldm_checkpoint(model)
    assert detect_preset(sd) == preset


@pytest.mark.parametrize("preset", ["tiny-depth", "tiny-upscaler"])
def test_single_file_of_a_depth_or_upscale_model_loads(preset, tmp_path):
    built = build_random(PRESETS[preset], seed=0)
    path = tmp_path / f"{preset}.safetensors"
    save_file(to_ldm_checkpoint(built), str(path))
    loaded = load_model(str(path), config=preset)
    assert loaded.kind == built.kind and _same_weights(built.unet, loaded.unet) and _same_weights(built.vae, loaded.vae)
    if preset == "tiny-upscaler":
        assert loaded.extra["max_noise_level"] == 350 and "low_res_scheduler" in loaded.extra
    else:  # the estimator is not read from a single file: a depth map must be given
        assert "depth_estimator" not in loaded.extra


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        depth = build_random(PRESETS["sd-2-depth"]).parameter_counts()
        up = build_random(PRESETS["sd-x4-upscaler"]).parameter_counts()
    # SD 2's UNet with 5 input channels (conv_in gains 320 x 3 x 3 weights); DPT-Hybrid ~122.4M
    assert abs(depth["unet"] - 865.914e6) < 0.01e6 and abs(depth["depth_estimator"] - 122.38e6) < 0.01e6
    assert abs(up["unet"] - 473.40e6) < 0.01e6 and abs(up["vae"] - 55.33e6) < 0.01e6  # x4 upscaler: 473M UNet
    assert abs(up["text_encoder"] - 340.39e6) < 0.01e6
