"""The openvino backend runs image-to-image and inpainting from an export's vae_encoder graph (and exports
it on the fly for a PyTorch model), within the FP32 tolerance of diffusers' pipelines."""
import json

import pytest
import torch

pytest.importorskip("openvino")

from fastsd import optimize  # noqa: E402
from fastsd.backends.openvino import backend as ov_backend  # noqa: E402
from fastsd.errors import ModelLoadError  # noqa: E402
from fastsd.export import export_model, load_onnx_model, reference_model  # noqa: E402
from fastsd.optimize import OptimizeConfig  # noqa: E402
from fastsd.verify import sample_inputs, verify  # noqa: E402


@pytest.fixture(autouse=True)
def ov_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "ov-cache"
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def export4(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov-tasks") / "tiny-onnx"
    export_model(_tiny, out, progress=False, echo=None)
    return out


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_verify_tasks_fp32(export4, task):
    onnx_model = load_onnx_model(export4)
    ref = reference_model(onnx_model, safety_checker=False)
    report, _, result, _ = verify(ref, OptimizeConfig(backend="openvino", device="cpu", safety_checker=False),
                                  steps=4, scheduler="ddim", engine_model=onnx_model, task=task, strength=0.75)
    assert report["passed"], report["images"]
    assert all(r["max_abs"] <= 2 for r in report["images"])
    assert result.timings["vae_encode"] > 0


def test_export_without_vae_encoder_says_what_to_do(_tiny, tmp_path):
    out = tmp_path / "no-enc"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    eng = optimize(load_onnx_model(out), OptimizeConfig(backend="openvino", device="cpu"))
    image, _ = sample_inputs("img2img", 64, 64)
    with pytest.raises(ModelLoadError, match="no vae_encoder graph.*--components"):
        eng.generate("a cat", image=image, num_inference_steps=2, progress=False)


def test_concurrent_callers_export_a_model_once(tiny, tmp_path, monkeypatch):
    """Two callers asking for one model's export at once (replicas or test workers sharing the cache): one
    writes it, the other waits and finds it, never two exports overwriting one folder."""
    import threading
    import time

    import fastsd.export
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    active, calls = [0, 0], []

    def slow_export(model, folder, components, **kw):
        active[0] += 1
        active[1] = max(active[1], active[0])
        calls.append(components)
        time.sleep(0.5)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "fastsd_export.json").write_text(json.dumps({"components": components.split(",")}))
        active[0] -= 1
    monkeypatch.setattr(fastsd.export, "export_model", slow_export)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ov_backend.export_for_openvino(tiny))) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(got) == 2 and got[0] == got[1]
    assert active[1] == 1 and len(calls) == 1, (active, calls)


def test_on_the_fly_export_adds_the_encoder_to_an_older_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(tmp_path / "ov-cache"))  # not the suite's: others export tiny whole
    folder = ov_backend.export_for_openvino(tiny)  # the graphs text-to-image needs, as cached before image tasks
    assert "vae_encoder" not in json.loads((folder / "fastsd_export.json").read_text())["components"]
    eng = optimize(tiny, backend="openvino", device="cpu", safety_checker=False)
    assert "vae_encoder" in json.loads((folder / "fastsd_export.json").read_text())["components"]
    image, _ = sample_inputs("img2img", 64, 64)
    out = eng.generate("a cat", image=image, strength=0.5, num_inference_steps=2, seed=0, progress=False)
    assert torch.isfinite(out.latents).all() and out.timings["vae_encode"] > 0
