"""The openvino backend runs a fastsd export (or a PyTorch model exported on the fly) with static shapes
compiled per (batch, height, width), and matches the FP32 diffusers reference at the dtype's tolerance."""
import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from fastsd import optimize  # noqa: E402
from fastsd.backends.openvino import backend as ov_backend  # noqa: E402
from fastsd.cli import main  # noqa: E402
from fastsd.errors import InvalidParameter, ModelLoadError  # noqa: E402
from fastsd.export import export_model, load_onnx_model, reference_model  # noqa: E402
from fastsd.optimize import OptimizeConfig  # noqa: E402
from fastsd.verify import verify  # noqa: E402


@pytest.fixture(autouse=True)
def ov_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "ov-cache"
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def export_dir(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "tiny-onnx"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    return out


def test_verify_cli_fp32_bit_close_and_bf16_within_tolerance(capsys, export_dir, tmp_path):
    for dtype, max_abs in (("fp32", 2), ("bf16", 255)):
        report = tmp_path / f"{dtype}.json"
        code = main(["verify", "--backend", "openvino", "--model", str(export_dir), "--steps", "4", "--dtype", dtype,
                     "--json", str(report), "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.out + out.err
        data = json.loads(report.read_text())
        assert data["passed"] and data["engine"]["backend"] == "openvino"
        want = "f32" if dtype == "fp32" else ("bf16" if data["engine"]["native_bf16"] else "f32")
        assert data["engine"]["inference_precision"] == {"text_encoder": "f32", "unet": want, "vae_decoder": want}
        for row in data["images"]:
            assert row["max_abs"] <= max_abs and (row["identical"] or row["psnr_db"] >= 30)


def test_static_shapes_compiled_once_each_and_bounded(export_dir, monkeypatch):
    monkeypatch.setattr(ov_backend, "MAX_SHAPES", 2)
    engine = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu", safety_checker=False)
    unet = engine.backend.graphs["unet"]
    assert unet.max_shapes == 2
    kw = dict(num_inference_steps=2, seed=1, progress=False, output_type="np")
    engine.generate("a cat", height=64, width=64, **kw)
    assert unet.compiles == 1  # every step of the loop reuses the one compiled shape
    engine.generate("a cat", height=64, width=64, **kw)
    assert unet.compiles == 1
    engine.generate("a cat", height=128, width=64, **kw)
    engine.generate("a cat", num_images_per_prompt=2, height=64, width=64, **kw)
    assert unet.compiles == 3 and len(unet.compiled) == 2  # LRU: the oldest shape was dropped
    keys = [dict(k)["sample"] for k in unet.compiled]
    assert keys == [(2, 4, 16, 8), (4, 4, 8, 8)]


def test_matches_torch_at_two_sizes_and_disk_cache_reused(export_dir, _tiny, ov_cache):
    torch_engine = optimize(copy.deepcopy(_tiny), backend="torch", device="cpu")
    kw = dict(num_inference_steps=2, seed=5, progress=False, output_type="np")
    first = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu")
    for n, size in ((1, 64), (3, 128)):
        a = first.generate("a cat", num_images_per_prompt=n, height=size, width=size, **kw)
        b = torch_engine.generate("a cat", num_images_per_prompt=n, height=size, width=size, **kw)
        assert a.images.shape == b.images.shape
        assert np.abs(a.images - b.images).max() * 255 <= 2
    folder = ov_cache / "compiled" / f"f32-{torch.get_num_threads()}t"
    blobs = sorted(p.name for p in folder.glob("*.blob"))
    assert len(blobs) >= 3  # text encoder, UNet and VAE decoder at least
    second = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu")
    c = second.generate("a cat", num_images_per_prompt=1, height=64, width=64, **kw)
    assert sorted(p.name for p in folder.glob("*.blob")) == blobs  # loaded from the cache, nothing new
    assert np.array_equal(c.images, first.generate("a cat", height=64, width=64, **kw).images)


def test_precision_hints_have_separate_caches(export_dir, ov_cache):
    """OpenVINO's cache key ignores the precision hint: fp32 after bf16 must not load the bf16 blob."""
    kw = dict(num_inference_steps=2, seed=3, progress=False, output_type="np")
    fp32 = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu").generate("a dog", **kw).images
    optimize(load_onnx_model(export_dir), backend="openvino", device="cpu", dtype="bf16").generate("a dog", **kw)
    again = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu").generate("a dog", **kw).images
    assert np.array_equal(fp32, again)


def test_pytorch_model_exported_once_into_the_cache(tiny, _tiny, ov_cache):
    engine = optimize(tiny, backend="openvino", device="cpu", safety_checker=False)
    d = engine.describe()
    folder = ov_cache / "exports"
    assert d["converted"].startswith(str(folder)) and (folder / d["converted"].split("/")[-1] / "unet" / "model.onnx").is_file()
    stamp = (folder / d["converted"].split("/")[-1] / "fastsd_export.json").stat().st_mtime
    ref = optimize(copy.deepcopy(_tiny), device="cpu", safety_checker=False)
    kw = dict(num_inference_steps=2, seed=0, progress=False, output_type="np")
    assert np.abs(engine.generate("a cat", **kw).images - ref.generate("a cat", **kw).images).max() * 255 <= 2
    again = optimize(copy.deepcopy(_tiny), backend="openvino", device="cpu", safety_checker=False)
    assert again.describe()["converted"] == d["converted"]
    assert (folder / d["converted"].split("/")[-1] / "fastsd_export.json").stat().st_mtime == stamp  # not re-exported


def test_api_verify_reference_from_export(export_dir):
    onnx_model = load_onnx_model(export_dir)
    ref = reference_model(onnx_model, safety_checker=False)
    report, engine, _, _ = verify(ref, OptimizeConfig(backend="openvino", device="cpu", safety_checker=False),
                                  prompts=["a cat"], steps=3, scheduler="euler", engine_model=onnx_model)
    assert report["passed"], report
    assert engine.describe()["threads"] == torch.get_num_threads()


def test_errors_are_one_line(export_dir, capsys, monkeypatch):
    with pytest.raises(InvalidParameter, match="dtype.*fp32, bf16"):
        optimize(load_onnx_model(export_dir), backend="openvino", device="cpu", dtype="fp16")
    code = main(["generate", "a cat", "--backend", "openvino", "--model", str(export_dir), "--dtype", "fp16",
                 "--quiet", "--out", str(export_dir.parent / "x.png")])
    assert code == 2 and "error: dtype" in capsys.readouterr().err
    assert OptimizeConfig(backend="openvino").validated().device == "cpu"  # auto: the CPU, whatever is visible

    def missing():
        raise ModelLoadError("backend openvino: the openvino package is not installed (pip install 'fastsd[openvino]')")
    monkeypatch.setattr(ov_backend, "import_openvino", missing)
    with pytest.raises(ModelLoadError, match="fastsd\\[openvino\\]"):
        optimize(load_onnx_model(export_dir), backend="openvino", device="cpu")


def test_serving_replica_builds_an_openvino_engine(export_dir):
    from fastsd.serving.replica import build_engine
    from fastsd.serving.spec import DeploymentSpec
    spec = DeploymentSpec(name="openvino", model=str(export_dir), threads=1,
                          engine={"backend": "openvino", "device": "cpu", "dtype": "fp32", "safety_checker": False})
    engine = build_engine(spec)
    assert engine.describe()["backend"] == "openvino" and engine.describe()["threads"] == 1
    r = engine.generate("a cat", num_inference_steps=2, seed=0, progress=False)
    assert r.images[0].size == (64, 64)
