"""The ONNX export of the depth UNet (5 input channels) and of the x4 upscaler's UNet (7 channels and
class_labels) loads in ONNX Runtime, matches PyTorch, and runs the engine within the FP32 tolerance of diffusers'
Depth2Img / Upscale pipelines (`fastsd verify --backend onnxruntime --model EXPORT`)."""
import json

import onnx
import pytest

from fastsd.cli import main
from fastsd.export import export_model, load_onnx_model, reference_model
from fastsd.loading import build_random
from fastsd.optimize import OptimizeConfig
from fastsd.presets import PRESETS
from fastsd.verify_kinds import verify_each


@pytest.fixture(scope="module", params=["tiny-depth", "tiny-upscaler"])
def export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-kinds") / f"{request.param}-onnx"
    info = export_model(build_random(PRESETS[request.param], seed=0), out, progress=False, echo=None,
                        components="text_encoder,unet,vae")
    return request.param, out, info


def test_unet_graph_inputs_and_parity(export):
    name, out, info = export
    graph = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in graph.graph.input}
    assert inputs["sample"].type.tensor_type.shape.dim[1].dim_value == (5 if name == "tiny-depth" else 7)
    if name == "tiny-upscaler":
        assert inputs["class_labels"].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert json.loads((out / "model_index.json").read_text())["max_noise_level"] == 350
        assert (out / "low_res_scheduler" / "scheduler_config.json").is_file()
    else:
        assert "class_labels" not in inputs
    unet = [r for r in info["parity"]["results"] if r["graph"].startswith("unet/")]
    assert unet and all(r["passed"] for r in unet)


def test_engine_on_the_export_matches_diffusers(export):
    name, out, _ = export
    onnx_model = load_onnx_model(out)
    assert onnx_model.kind == ("depth" if name == "tiny-depth" else "upscale")
    ref = reference_model(onnx_model, safety_checker=False)
    [(report, _, result)], _ = verify_each(ref, [OptimizeConfig(backend="onnxruntime", device="cpu",
                                                                safety_checker=False)],
                                           steps=3, engine_model=onnx_model)
    assert report["passed"], report["images"]
    assert all(r["max_abs"] <= 2 for r in report["images"])


def test_verify_cli_on_the_export(export, capsys):
    _, out, _ = export
    code = main(["verify", "--model", str(out), "--backend", "onnxruntime", "--steps", "2", "-q",
                 "--no-safety-checker"])
    text = capsys.readouterr().out
    assert code == 0 and "PASS" in text, text
