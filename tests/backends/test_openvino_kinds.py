"""The openvino backend runs depth-to-image (5-channel UNet) and the x4 upscaler (7-channel UNet, noise level as
class_labels) within the FP32 tolerance of diffusers' Depth2Img / Upscale pipelines, as the onnxruntime backend
does (tests/backends/test_onnxruntime_kinds.py): a PyTorch folder is exported on the fly, an export folder runs
as it is."""
import pytest
import torch

pytest.importorskip("openvino")

from fastsd import load_model, optimize  # noqa: E402
from fastsd.export import export_model, load_onnx_model  # noqa: E402
from fastsd.optimize import OptimizeConfig  # noqa: E402
from fastsd.verify_kinds import sample_image, verify_each  # noqa: E402

OV = OptimizeConfig(backend="openvino", device="cpu", safety_checker=False)


@pytest.fixture(autouse=True)
def ov_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(tmp_path_factory.getbasetemp() / "ov-cache"))


# the upscaler (its class_labels input is the new path) in the default suite; depth, whose UNet call is the
# plain one with a fifth channel, among the slow tests (an export and OpenVINO compiles cost ~30 s here)
@pytest.mark.parametrize("kind", [pytest.param("depth", marks=pytest.mark.slow), "upscale"])
def test_torch_folder_matches_diffusers(kind, request):
    """The folder as diffusers wrote it: exported once into the cache, compiled, compared with the pipeline
    (the upscaler at a noise level other than the default, so the class label counts)."""
    folder = request.getfixturevalue("tiny_depth_folder" if kind == "depth" else "tiny_upscaler_folder")
    model = load_model(str(folder), safety_checker=False)
    assert model.kind == kind
    extra = {"noise_level": 150} if kind == "upscale" else {}
    [(report, engine, result)], _ = verify_each(model, [OV], steps=3, **extra)
    assert engine.describe()["backend"] == "openvino"
    assert report["passed"], report["images"]
    assert all(r["max_abs"] <= 2 for r in report["images"])
    assert result.images[0].size == (64, 64)  # depth: the image's size; the upscaler: 4 x its 16x16 input


@pytest.mark.slow
def test_upscaler_export_tiled_matches_the_torch_engine(tiny_upscaler_folder, tmp_path):
    """An export folder (class_labels int64 in its UNet graph) and an input above the tile size: the UNet runs
    on 16x16 windows (3 x 2, the last of each row and column shifted back) blended as the torch backend does."""
    model = load_model(str(tiny_upscaler_folder), safety_checker=False)
    out = tmp_path / "up-onnx"
    export_model(model, out, progress=False, echo=None, components="text_encoder,unet,vae")
    onnx_model = load_onnx_model(out)
    assert onnx_model.kind == "upscale"
    image = sample_image((40, 24))
    kw = dict(image=image, noise_level=60, tile_size=16, num_inference_steps=2, seed=3, progress=False)
    ov = optimize(onnx_model, OV).generate("a cat", **kw)
    pt = optimize(model, dtype="fp32", device="cpu", safety_checker=False).generate("a cat", **kw)
    assert ov.images[0].size == (160, 96)
    assert torch.allclose(ov.latents, pt.latents, atol=1e-3), (ov.latents - pt.latents).abs().max()
