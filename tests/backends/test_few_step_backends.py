"""The few-step path on the graph backends: LCM and TCD at guidance 1 (one UNet call per step at the batch
size), and a tiny VAE exported as the VAE graphs (fastsd export --vae-tiny), on onnxruntime and openvino, each
against diffusers' FP32 pipeline with the same scheduler and tiny VAE."""
import json

import pytest

from fastsd import optimize
from fastsd.cli import main
from fastsd.export import export_model, load_onnx_model, reference_model
from fastsd.optimize import OptimizeConfig
from fastsd.tiny_vae import is_tiny, use_tiny_vae
from fastsd.verify import verify

BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed"))]


@pytest.fixture(autouse=True)
def ov_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(tmp_path_factory.getbasetemp() / "ov-cache-few-step"))


@pytest.fixture(scope="module")
def tiny_vae_export(_tiny, tiny_vae_folder, tmp_path_factory):
    """The tiny model with the tiny VAE, exported with every graph (the VAE encoder too, for image-to-image)."""
    import copy
    out = tmp_path_factory.mktemp("few-step") / "tiny-taesd-onnx"
    export_model(use_tiny_vae(copy.deepcopy(_tiny), tiny_vae_folder), out, progress=False, echo=None)
    return out


def test_export_writes_the_tiny_vae_and_names_it(tiny_vae_export, tiny_vae_folder):
    info = json.loads((tiny_vae_export / "fastsd_export.json").read_text())
    assert info["model"]["vae_tiny"] == str(tiny_vae_folder.resolve())
    for graph in ("vae_decoder", "vae_encoder"):
        assert json.loads((tiny_vae_export / graph / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    model = load_onnx_model(tiny_vae_export)
    assert is_tiny(model.vae) and model.vae.config.scaling_factor == 1.0
    assert is_tiny(reference_model(model, safety_checker=False).vae)  # verify's reference has it too


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_few_step_verify_with_tiny_vae(tiny_vae_export, backend, scheduler):
    onnx_model = load_onnx_model(tiny_vae_export)
    ref = reference_model(onnx_model, safety_checker=False)
    report, engine, _, _ = verify(ref, OptimizeConfig(backend=backend, safety_checker=False), steps=4, guidance=1.0,
                                  scheduler=scheduler, engine_model=onnx_model)
    assert report["passed"], report["images"]
    assert all(r["identical"] or r["psnr_db"] >= 45 for r in report["images"]), report["images"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_one_is_one_unet_call_per_step_at_batch_size(tiny_vae_export, backend):
    engine = optimize(load_onnx_model(tiny_vae_export), backend=backend, safety_checker=False)
    batches = []
    real = engine.backend.unet
    engine.backend.unet = lambda x, t, e, **kw: batches.append((x.shape[0], e.shape[0])) or real(x, t, e, **kw)
    engine.generate(["a cat", "a dog"], num_inference_steps=4, guidance_scale=1.0, scheduler="lcm", seed=0,
                    progress=False)
    assert batches == [(2, 2)] * 4
    batches.clear()
    engine.generate(["a cat", "a dog"], num_inference_steps=2, guidance_scale=7.5, scheduler="lcm", seed=0,
                    progress=False)
    assert batches == [(4, 4)] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_img2img_with_the_tiny_vae_encoder_graph(tiny_vae_export, backend):
    onnx_model = load_onnx_model(tiny_vae_export)
    ref = reference_model(onnx_model, safety_checker=False)
    report, *_ = verify(ref, OptimizeConfig(backend=backend, safety_checker=False), steps=4, guidance=1.0,
                        scheduler="lcm", engine_model=onnx_model, task="img2img", strength=0.75)
    assert report["passed"], report["images"]


def test_cli_export_with_vae_tiny_then_generate(capsys, tiny_vae_folder, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--model", "tiny", "--random-weights", "--vae-tiny", str(tiny_vae_folder), "--out", str(out),
                 "--components", "text_encoder,unet,vae_decoder", "--quiet"]) == 0
    capsys.readouterr()
    code = main(["verify", "--backend", "onnxruntime", "--model", str(out), "--scheduler", "lcm", "--steps", "4",
                 "--guidance", "1", "--quiet", "--no-safety-checker"])
    stdout = capsys.readouterr().out
    assert code == 0 and "PASS" in stdout, stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_exports_a_torch_model_with_its_tiny_vae_on_the_fly(capsys, tiny_vae_folder):
    code = main(["verify", "--backend", "openvino", "--model", "tiny", "--vae-tiny", str(tiny_vae_folder),
                 "--scheduler", "lcm", "--steps", "2", "--guidance", "1", "--quiet", "--no-safety-checker"])
    stdout = capsys.readouterr().out
    assert code == 0 and "PASS" in stdout and "'converted'" in stdout, stdout
