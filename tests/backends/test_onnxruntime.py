"""The onnxruntime backend runs a fastsd export in the engine's loop and matches the FP32 diffusers reference."""
import json

import numpy as np
import pytest

from fastsd import optimize
from fastsd.cli import main
from fastsd.errors import InvalidParameter, ModelLoadError
from fastsd.export import export_model, load_onnx_model, reference_model
from fastsd.optimize import OptimizeConfig
from fastsd.verify import verify


@pytest.fixture(scope="module")
def export_dir(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "tiny-onnx"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    return out


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verify_cli_passes_against_fp32_reference(capsys, export_dir, tmp_path):
    report = tmp_path / "v.json"
    code, stdout, err = run(capsys, "verify", "--backend", "onnxruntime", "--model", str(export_dir), "--steps", "4",
                            "--json", str(report), "--quiet")
    assert code == 0, stdout + err
    assert "PASS" in stdout and "'backend': 'onnxruntime'" in stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["model"] == "tiny"
    assert data["engine"]["providers"] == {k: ["CPUExecutionProvider"] for k in ("text_encoder", "unet", "vae_decoder")}
    for row in data["images"]:
        assert row["max_abs"] <= 2 and row["latent_cosine"] > 0.99999


def test_api_verify_and_describe(export_dir):
    onnx_model = load_onnx_model(export_dir)
    ref = reference_model(onnx_model, safety_checker=False)
    report, engine, result, _ = verify(ref, OptimizeConfig(backend="onnxruntime", safety_checker=False),
                                       prompts=["a cat"], steps=3, scheduler="euler", engine_model=onnx_model)
    assert report["passed"], report
    d = engine.describe()
    assert d["backend"] == "onnxruntime" and d["device"] == "cpu" and d["dtype"] == "fp32"
    assert d["graphs"]["unet"] == "unet/model.onnx" and d["threads"] >= 1


def test_two_resolutions_and_batches_from_one_export(export_dir, _tiny):
    """Dynamic axes end to end: the same export at 64 and 128 px, one and three images, as the torch backend."""
    import copy
    ort_engine = optimize(load_onnx_model(export_dir), backend="onnxruntime")
    torch_engine = optimize(copy.deepcopy(_tiny), backend="torch")
    for n, size in ((1, 64), (3, 128)):
        kw = dict(num_images_per_prompt=n, num_inference_steps=2, height=size, width=size, seed=5, progress=False,
                  output_type="np")
        a, b = ort_engine.generate("a cat", **kw), torch_engine.generate("a cat", **kw)
        assert a.images.shape == (n, size, size, 3)
        assert np.abs(a.images - b.images).max() < 1e-3
        assert np.abs(a.latents - b.latents).max() < 1e-3


def test_generate_cli(capsys, export_dir, tmp_path):
    code, stdout, err = run(capsys, "generate", "a cat", "--backend", "onnxruntime", "--model", str(export_dir),
                            "--steps", "2", "--seed", "1", "--out", str(tmp_path / "img.png"))
    assert code == 0, err
    assert (tmp_path / "img.png").is_file() and "'providers'" in err


def test_fp16_export_runs_end_to_end(capsys, _tiny, tmp_path):
    out = tmp_path / "fp16"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", dtype="fp16", progress=False, echo=None)
    code, stdout, err = run(capsys, "verify", "--backend", "onnxruntime", "--model", str(out), "--dtype", "fp16",
                            "--steps", "3", "--quiet")
    assert code == 0, stdout + err
    assert "tolerance (fp16)" in stdout and "PASS" in stdout
    # asking for another dtype than the export's is a one-line error
    code, _, err = run(capsys, "verify", "--backend", "onnxruntime", "--model", str(out), "--steps", "2", "--quiet")
    assert code == 2 and "dtype: got 'fp32'; allowed: fp16 (the dtype" in err


def test_static_export_runs_in_slices_and_refuses_other_sizes(_tiny, tmp_path):
    out = tmp_path / "static"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", static=True, batch="1", resolution="64",
                 progress=False, echo=None)
    engine = optimize(load_onnx_model(out), backend="onnxruntime")
    res = engine.generate("a cat", num_images_per_prompt=2, num_inference_steps=2, seed=0, progress=False)
    assert len(res.images) == 2  # the UNet graph takes 2 (guidance), the VAE 1: the batch runs in slices
    with pytest.raises(InvalidParameter, match="shapes .* was exported for"):
        engine.generate("a cat", height=128, width=128, num_inference_steps=1, progress=False)


def test_pytorch_model_is_refused_with_a_hint(tiny):
    with pytest.raises(ModelLoadError, match="fastsd export --model tiny --out DIR"):
        optimize(tiny, backend="onnxruntime")


def test_provider_override_checked(export_dir, monkeypatch):
    monkeypatch.setenv("FASTSD_ORT_PROVIDERS", "NoSuchExecutionProvider")
    with pytest.raises(InvalidParameter, match="FASTSD_ORT_PROVIDERS"):
        optimize(load_onnx_model(export_dir), backend="onnxruntime")
    monkeypatch.setenv("FASTSD_ORT_PROVIDERS", "CPUExecutionProvider")
    d = optimize(load_onnx_model(export_dir), backend="onnxruntime").describe()
    assert d["providers"]["unet"] == ["CPUExecutionProvider"]


def test_device_chooses_providers_checked_against_onnxruntime(export_dir, monkeypatch):
    import onnxruntime as ort

    from fastsd.backends.onnxruntime.backend import choose_providers
    monkeypatch.delenv("FASTSD_ORT_PROVIDERS", raising=False)
    assert choose_providers(ort, "cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers(ort, "cuda:1") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.undo()
    monkeypatch.delenv("FASTSD_ORT_PROVIDERS", raising=False)
    # the CPU build of onnxruntime has no GPU provider: --device cuda is a clear error naming the device,
    # decided by onnxruntime, not by torch (a CPU-only torch must not block onnxruntime-gpu)
    with pytest.raises(InvalidParameter, match="device.*onnxruntime-gpu"):
        optimize(load_onnx_model(export_dir), backend="onnxruntime", device="cuda")


def test_tensorrt_cache_folder_exists_before_each_session_and_device_id_is_kept(export_dir, pretend_gpu):
    engine = optimize(load_onnx_model(export_dir), backend="onnxruntime", device="cuda:1")
    assert [m["providers"][0] for m in pretend_gpu.made] == ["TensorrtExecutionProvider"] * 3
    for m in pretend_gpu.made:
        trt, cuda = m["options"][0], m["options"][1]
        assert trt["device_id"] == "1" and cuda["device_id"] == "1"
        assert trt["trt_engine_cache_path"].endswith(f"trt_cache/{m['path'].split('/')[-2]}")
        assert m["kwargs"] == {"enable_fallback": 0}  # onnxruntime's own retry would drop every option
    assert (export_dir / "trt_cache" / "unet").is_dir()
    assert engine.describe()["providers"]["unet"][0] == "TensorrtExecutionProvider"


def test_tensorrt_failure_retries_with_cuda_keeping_its_options(export_dir, pretend_gpu, caplog):
    pretend_gpu.fail_with_tensorrt = True
    with caplog.at_level("WARNING", logger="fastsd"):
        engine = optimize(load_onnx_model(export_dir), backend="onnxruntime", device="cuda:1")
    assert engine.describe()["providers"]["unet"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    retried = [m for m in pretend_gpu.made if m["providers"][0] == "CUDAExecutionProvider"]
    assert len(retried) == 3 and all(m["options"][0] == {"device_id": "1"} for m in retried)
    assert "TensorRT could not start" in caplog.text


def test_an_onnxruntime_that_ignores_enable_fallback_does_not_put_cuda_1_on_gpu_0(export_dir, pretend_gpu, caplog):
    """onnxruntime 1.18-1.22 retry a failed TensorRT session on CUDA with no provider options whatever
    enable_fallback says: cuda:1 ran on GPU 0. The placement is checked and the retry is fastsd's own."""
    pretend_gpu.fail_with_tensorrt = pretend_gpu.ignores_enable_fallback = True
    with caplog.at_level("WARNING", logger="fastsd"):
        engine = optimize(load_onnx_model(export_dir), backend="onnxruntime", device="cuda:1")
    assert "fell back on its own" in caplog.text and "on device 0, not 1" in caplog.text
    for comp, graph in engine.backend.graphs.items():
        assert graph.session.get_provider_options()["CUDAExecutionProvider"]["device_id"] == "1", comp
    assert [m["providers"][0] for m in pretend_gpu.made] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"] * 3


def test_misplaced_session_without_a_retry_is_an_error(export_dir, pretend_gpu, monkeypatch):
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(pretend_gpu, "get_provider_options",
                        lambda self: {"CUDAExecutionProvider": {"device_id": "0"}, "CPUExecutionProvider": {}})
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider on device 0, not 1"):
        optimize(load_onnx_model(export_dir), backend="onnxruntime", device="cuda:1")


def test_optimize_exports_are_not_given_to_tensorrt(export_dir, tmp_path, pretend_gpu):
    """An --optimize export's graphs hold onnxruntime contrib ops: TensorRT would get split subgraphs whose
    inputs have no shape profiles. Stand-in: the plain export with a model.gpu.onnx beside each graph."""
    import shutil
    out = tmp_path / "opt"
    shutil.copytree(export_dir, out, ignore=shutil.ignore_patterns("trt_cache"))
    for comp in ("text_encoder", "unet", "vae_decoder"):
        shutil.copy(out / comp / "model.onnx", out / comp / "model.gpu.onnx")
    optimize(load_onnx_model(out), backend="onnxruntime", device="cuda")
    assert len(pretend_gpu.made) == 3
    assert all(m["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] for m in pretend_gpu.made)
    assert all(m["path"].endswith("model.gpu.onnx") for m in pretend_gpu.made)
