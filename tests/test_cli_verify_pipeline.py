"""`fastsd verify --pipeline KINDS`: diffusers' own pipelines over a model, plain and after fastsd.accelerate."""
import json

import pytest

from fastsd.cli import main


def test_verify_pipeline_fp32_is_bit_identical(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = main(["verify", "--model", "tiny", "--pipeline", "inpaint,controlnet", "--steps", "2", "--device", "cpu",
               "-q", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text and "StableDiffusionControlNetPipeline" in text
    report = json.loads(out.read_text())
    assert set(report) == {"inpaint", "controlnet"}
    for r in report.values():
        img = r["images"][0]  # standard JSON: a bit-identical image has PSNR null and identical true
        assert r["passed"] and img["max_abs"] == 0 and img["psnr_db"] is None and img["identical"]


def test_verify_pipeline_with_a_few_step_scheduler_and_a_tiny_vae(tmp_path, capsys, tiny_vae_folder):
    # diffusers' own LCMScheduler and AutoencoderTiny in the pipeline, on both sides; guidance 1: no CFG
    out = tmp_path / "v.json"
    rc = main(["verify", "--model", "tiny", "--pipeline", "txt2img,img2img", "--scheduler", "lcm", "--steps", "4",
               "--guidance", "1", "--vae-tiny", str(tiny_vae_folder), "--device", "cpu", "-q", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text, text
    for r in json.loads(out.read_text()).values():
        assert r["passed"] and r["images"][0]["identical"], r["images"]


def test_verify_pipeline_with_the_openvino_runners(tmp_path, capsys):
    pytest.importorskip("openvino")
    out = tmp_path / "v.json"
    rc = main(["verify", "--model", "tiny", "--pipeline", "txt2img,inpaint", "--backend", "openvino", "--dtype", "fp32",
               "--steps", "2", "--device", "cpu", "-q", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text and "openvino(unet), openvino(vae_decoder)" in text
    report = json.loads(out.read_text())
    for r in report.values():
        assert r["passed"] and r["tolerance"]["name"] == "fp32" and r["accelerate"]["backend"] == "openvino"
        assert r["accelerate"]["calls"]["runner"] > 0 and r["accelerate"]["calls"]["torch"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "txt2vid"], "pipeline: got 'txt2vid'; allowed: a comma list of txt2img, img2img"),
    (["--pipeline", "txt2img", "--backend", "onnxruntime"], "accelerate exports the pipeline itself"),
    (["--pipeline", "txt2img", "--backend", "openvino", "--dtype", "fp16"], "dtype: got 'fp16'; allowed: fp32, bf16"),
    (["--pipeline", "controlnet", "--controlnet", "/nonexistent"], "controlnet: got '/nonexistent'; allowed: a "
     "diffusers ControlNet folder"),
])
def test_verify_pipeline_bad_input_is_one_line(argv, message, capsys):
    assert main(["verify", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
