"""int8 UNet in the openvino backend (NNCF post-training quantization): calibrated on the user's prompts,
cached once per export and recipe, within the APPROXIMATE tolerance of FP32, and clear errors for bad input."""
import json

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from fastsd import optimize  # noqa: E402
from fastsd.backends.openvino import int8 as openvino_int8  # noqa: E402
from fastsd.cli import main  # noqa: E402
from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.export import export_model, load_onnx_model  # noqa: E402
from fastsd.optimize import OptimizeConfig  # noqa: E402
from fastsd.reference import APPROXIMATE, tolerance_for  # noqa: E402


@pytest.fixture(autouse=True)
def ov_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "ov-int8-cache"
    monkeypatch.setenv("FASTSD_OPENVINO_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def export_dir(_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov8") / "tiny-onnx"
    export_model(_tiny, out, components="text_encoder,unet,vae_decoder", progress=False, echo=None)
    return out


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("# two prompts\na red circle on a blue background\n\na green square\n")
    return f


def test_verify_int8_within_approximate_tolerance_and_quantized_once(capsys, export_dir, prompts_file, tmp_path,
                                                                      ov_cache, monkeypatch):
    monkeypatch.setattr(openvino_int8, "CALIBRATION_STEPS", 2)  # keeps the test short; the default is 6
    calls = []
    quantize = openvino_int8.quantize
    monkeypatch.setattr(openvino_int8, "quantize", lambda *a, **k: calls.append((a[3], len(a[2]))) or quantize(*a, **k))
    report = tmp_path / "int8.json"
    code = main(["verify", "--backend", "openvino", "--model", str(export_dir), "--steps", "4", "--dtype", "bf16",
                 "--int8", "--calibration-prompts", str(prompts_file), "--json", str(report), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    data = json.loads(report.read_text())
    assert data["passed"] and data["tolerance_name"] == APPROXIMATE.name
    assert data["engine"]["int8"] == "hybrid" and data["engine"]["inference_precision"]["unet"].startswith("int8")
    [(recipe, feeds)] = calls  # calibrated once, on every UNet input of 2 prompts x the calibration steps
    assert recipe == "hybrid" and feeds >= 2 * openvino_int8.CALIBRATION_STEPS
    assert all(row["psnr_db"] >= APPROXIMATE.min_psnr for row in data["images"])
    [xml] = ov_cache.glob("int8/*/unet.xml")  # the int8 UNet is cached on disk
    import openvino as ov
    quantized = {i.get_node().get_friendly_name() for op in ov.Core().read_model(str(xml)).get_ops()
                 if op.get_type_name() == "FakeQuantize" for i in op.output(0).get_target_inputs()}
    assert any("/down_blocks.1/" in n for n in quantized)  # the inner blocks run int8 ...
    for kept in ("/conv_in/", "/conv_out/", "/down_blocks.0/"):  # ... the layers that broke the image do not
        assert not any(kept in n for n in quantized), kept
    # a second engine over the same export and prompts loads the cached int8 UNet: no second calibration
    engine = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu", int8="hybrid",
                      calibration_prompts=str(prompts_file), safety_checker=False)
    assert len(calls) == 1
    img = engine.generate("a cat", num_inference_steps=2, seed=1, progress=False, output_type="np").images
    assert img.shape[0] == 1


def test_calibration_records_every_unet_input(export_dir, monkeypatch):
    monkeypatch.setattr(openvino_int8, "CALIBRATION_STEPS", 3)
    engine = optimize(load_onnx_model(export_dir), backend="openvino", device="cpu", safety_checker=False)
    b, model = engine.backend, engine.model
    feeds = openvino_int8.calibration_inputs(model, b.calibration_graph("text_encoder"), b.calibration_graph("unet"),
                                             ["a", "b"], steps=3)
    size = openvino_int8.calibration_size(model) // model.vae_scale_factor
    assert len(feeds) >= 2 * 3
    assert feeds[0]["sample"].shape == (2, 4, size, size)  # guided: unconditional and text halves
    assert feeds[0]["encoder_hidden_states"].shape[0] == 2
    assert len({float(f["timestep"].reshape(-1)[0]) for f in feeds}) >= 3  # several noise levels


def test_int8_errors_name_the_parameter(tmp_path, prompts_file):
    with pytest.raises(InvalidParameter, match="int8.*--backend openvino"):
        OptimizeConfig(backend="torch", device="cpu", int8="hybrid").validated()
    with pytest.raises(InvalidParameter, match="int8"):
        OptimizeConfig(backend="openvino", device="cpu", int8="int4").validated()
    with pytest.raises(InvalidParameter, match="calibration_prompts.*only with --int8"):
        OptimizeConfig(backend="openvino", device="cpu", calibration_prompts=str(prompts_file)).validated()
    with pytest.raises(InvalidParameter, match="calibration_prompts.*readable"):
        OptimizeConfig(backend="openvino", device="cpu", int8="hybrid",
                       calibration_prompts=str(tmp_path / "missing.txt")).validated()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidParameter, match="1..64 prompts"):
        OptimizeConfig(backend="openvino", device="cpu", int8="full", calibration_prompts=str(empty)).validated()
    assert tolerance_for(OptimizeConfig(backend="openvino", int8="hybrid")) is APPROXIMATE


def test_cli_int8_error_is_one_line(capsys, tmp_path):
    code = main(["generate", "a cat", "--model", "tiny", "--random-weights", "--int8", "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "int8" in err and "Traceback" not in err


def test_default_calibration_set_is_shipped():
    prompts = openvino_int8.read_prompts(None)
    assert 4 <= len(prompts) <= openvino_int8.MAX_PROMPTS and all(p and not p.startswith("#") for p in prompts)
