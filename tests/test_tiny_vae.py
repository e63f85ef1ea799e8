"""A tiny VAE (AutoencoderTiny, TAESD format) in place of the model's own (fastsd.tiny_vae, --vae-tiny): the
engine decodes and encodes with it exactly as diffusers' pipelines do with the same tiny VAE."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastsd import OptimizeConfig, optimize
from fastsd.cli import main
from fastsd.errors import InvalidParameter
from fastsd.loading import load_model
from fastsd.reference import psnr, run_reference, to_uint8
from fastsd.tiny_vae import is_tiny, use_tiny_vae
from fastsd.verify import verify


def drawn(size=64):
    im = Image.new("RGB", (size, size), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(200, 30, 30))
    return im


def corner_mask(size=64):
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((0, 0, size // 2 - 1, size // 2 - 1), fill=255)
    return m


def test_loads_in_place_of_the_vae(tiny, tiny_vae_folder):
    full = sum(p.numel() for p in tiny.vae.parameters())
    model = use_tiny_vae(tiny, tiny_vae_folder)
    assert is_tiny(model.vae) and model.vae.config.scaling_factor == 1.0
    assert sum(p.numel() for p in model.vae.parameters()) < full
    assert model.extra["vae_tiny"] == str(tiny_vae_folder.resolve())


@pytest.mark.parametrize("task", ["text2img", "img2img", "inpaint"])
def test_engine_equals_diffusers_with_the_same_tiny_vae(tiny, tiny_vae_folder, task):
    model = use_tiny_vae(tiny, tiny_vae_folder)
    images = {}
    if task != "text2img":
        images = {"image": [drawn(), drawn()], "strength": 0.7 if task == "img2img" else 1.0}
        if task == "inpaint":
            images["mask_image"] = [corner_mask(), corner_mask()]
    prompts = ["a red circle", "a blue square"]
    ref_images, ref_latents, _, _ = run_reference(copy.deepcopy(model), prompts, ["", ""], num_images_per_prompt=1,
                                                  steps=4, guidance=7.5, height=64, width=64, seeds=[3, 4],
                                                  scheduler="euler-ancestral", **images)
    out = optimize(model).generate(prompts, num_inference_steps=4, guidance_scale=7.5, seed=3,
                                   scheduler="euler-ancestral", progress=False, **images)
    # Measured: latents equal up to float rounding (0 for text2img and img2img, 1.8e-5 on values near 13 for
    # inpaint, whose encodes batch differently), images PSNR inf; an ancestral scheduler also checks that the
    # encode draws nothing from the generators (a tiny VAE's encoder gives latents, not a distribution)
    assert (out.latents - ref_latents).abs().max().item() <= 1e-4
    a, b = to_uint8(ref_images), to_uint8(out.images)
    assert min(psnr(x, y) for x, y in zip(a, b)) >= 45


def test_few_step_with_tiny_vae_verify_passes(tiny, tiny_vae_folder):
    report, *_ = verify(use_tiny_vae(tiny, tiny_vae_folder), OptimizeConfig(safety_checker=False), steps=4,
                        guidance=1.0, scheduler="lcm")
    assert report["passed"], report["images"]
    assert all(r["psnr_db"] is None or r["psnr_db"] >= 45 for r in report["images"])


def test_bad_folders_are_clear_errors(tiny, tiny_folder, tiny_vae_folder, tmp_path):
    with pytest.raises(InvalidParameter, match="vae_tiny.*AutoencoderTiny"):
        use_tiny_vae(copy.deepcopy(tiny), tmp_path)  # no config.json
    with pytest.raises(InvalidParameter, match="vae_tiny.*holds a AutoencoderKL"):
        use_tiny_vae(copy.deepcopy(tiny), tiny_folder / "vae")  # the full VAE
    from diffusers import AutoencoderTiny
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "two-blocks")
    with pytest.raises(InvalidParameter, match="scales images by 8"):
        use_tiny_vae(copy.deepcopy(tiny), tmp_path / "two-blocks")
    cfg = json.loads((tiny_vae_folder / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny"


def test_cli_generate_and_verify_with_vae_tiny(capsys, tmp_path, tiny_vae_folder):
    out = tmp_path / "t.png"
    code = main(["generate", "a cat", "--model", "tiny", "--vae-tiny", str(tiny_vae_folder), "--steps", "4",
                 "--guidance", "1", "--scheduler", "lcm", "--out", str(out), "--quiet", "--no-safety-checker"])
    assert code == 0 and Image.open(out).size == (64, 64)
    capsys.readouterr()
    code = main(["verify", "--model", "tiny", "--vae-tiny", str(tiny_vae_folder), "--steps", "4", "--guidance", "1",
                 "--scheduler", "lcm", "--quiet", "--no-safety-checker"])
    stdout = capsys.readouterr().out
    assert code == 0 and "PASS" in stdout and "AutoencoderTiny" not in stdout
    code = main(["generate", "x", "--model", "tiny", "--vae-tiny", str(tmp_path / "none"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "vae_tiny" in err and "Traceback" not in err


def test_onnx_export_folder_refuses_vae_tiny(tiny_vae_folder, tmp_path):
    from fastsd.backends import load_for_backend
    with pytest.raises(InvalidParameter, match="fastsd export --vae-tiny"):
        load_for_backend("onnxruntime", str(tmp_path), vae_tiny=str(tiny_vae_folder))


def test_a_loaded_model_keeps_its_tiny_vae(tiny_vae_folder):
    model = load_model("tiny", vae_tiny=str(tiny_vae_folder))
    assert is_tiny(model.vae)
    img = optimize(model, safety_checker=False).generate("a cat", num_inference_steps=2, seed=0, progress=False).images[0]
    assert np.asarray(img).std() > 0
    assert torch.is_tensor(next(model.vae.parameters()))
