"""The one-line errors of fastsd export (exit 2), and that a failed export leaves nothing that looks complete."""
import errno
import json

import pytest

from fastsd.cli import main
from fastsd.export import (DiskFull, NotAnExport, OutputNotEmpty, TensorRTMissing, UnknownComponent,
                           UnsupportedOpset, export_model, load_onnx_model)
from fastsd.export import writer
from fastsd.export.tensorrt import have_tensorrt


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("fastsd ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_export_writes_a_runnable_folder(capsys, tmp_path):
    out = tmp_path / "cli"
    code, stdout, _ = run(capsys, "export", "--model", "tiny", "--out", str(out), "--components", "text_encoder,unet,vae",
                          "--batch", "1:1:2", "--quiet")
    assert code == 0
    assert "max abs" in stdout and "rel" in stdout and stdout.count(" ok") == 4  # parity per graph, printed
    info = json.loads((out / "fastsd_export.json").read_text())
    assert info["shapes"]["batch"] == {"min": 1, "opt": 1, "max": 2}
    assert load_onnx_model(out).name == "tiny"


def test_unknown_component(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(tmp_path / "x"), "--components", "unet,safety")
    assert code == 2
    assert "components: got 'safety'; allowed: text_encoder, unet, vae_decoder, vae_encoder" in one_line_error(err)
    with pytest.raises(UnknownComponent):
        export_model(None, tmp_path / "y", components=["clip"])


@pytest.mark.parametrize("opset", ["9", "21", "seventeen"])
def test_unsupported_opset(capsys, tmp_path, opset):
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(tmp_path / "x"), "--opset", opset)
    assert code == 2 and "opset: got" in one_line_error(err) and "14..20" in err
    assert not (tmp_path / "x").exists()  # checked before anything is written
    with pytest.raises(UnsupportedOpset):
        export_model(None, tmp_path / "y", opset=int(opset) if opset.isdigit() else opset)


def test_output_folder_not_empty_refused_unless_overwrite(capsys, tmp_path, tiny_export, _tiny):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(out))
    assert code == 2 and "not empty" in one_line_error(err) and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(out), "--components", "unet",
                       "--overwrite", "--quiet")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces an export's entries only
    assert (out / "unet" / "model.onnx").is_file()
    with pytest.raises(OutputNotEmpty):
        export_model(_tiny, tiny_export[0])


def test_disk_full_leaves_no_half_written_graph(capsys, tmp_path, monkeypatch, _tiny):
    calls = []

    def full_disk(model, path, external):
        calls.append(path.name)
        if "unet" in str(path):  # text_encoder fits, the UNet does not: half a file, then ENOSPC
            path.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(model, path, external)

    original = writer._save
    monkeypatch.setattr(writer, "_save", full_disk)
    out = tmp_path / "full"
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(out), "--quiet")
    assert code == 2
    assert "no space left on the device while writing" in one_line_error(err) and "unet" in err
    assert calls == ["model.onnx", "model.onnx"]  # text_encoder, then the UNet failed
    # nothing looks complete: no graph in place, no partial files, no fastsd_export.json
    assert not any(out.rglob("*.onnx")) and not any(out.rglob("*.partial*"))
    assert not (out / "fastsd_export.json").exists()
    with pytest.raises(DiskFull):
        export_model(_tiny, tmp_path / "full2", components="unet", progress=False, echo=None)


def test_parity_failure_is_a_clear_error(capsys, tmp_path, monkeypatch, _tiny):
    from fastsd.export import ParityError, parity
    monkeypatch.setitem(parity.TOLERANCES, "fp32", 0.0)  # nothing passes a zero tolerance
    out = tmp_path / "strict"
    with pytest.raises(ParityError, match=r"unet/model.onnx is beyond the fp32 tolerance \(rel .* > 0"):
        export_model(_tiny, out, components="unet", progress=False, echo=None)
    assert not any(out.rglob("*.onnx"))


@pytest.mark.skipif(have_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_missing(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model", "tiny", "--out", str(tmp_path / "trt"), "--tensorrt")
    assert code == 2 and "`tensorrt` Python package is not installed" in one_line_error(err)
    assert not (tmp_path / "trt").exists()
    with pytest.raises(TensorRTMissing):
        export_model(None, tmp_path / "trt2", tensorrt=True)


def test_not_an_export_folder_with_backend_onnxruntime(capsys, tmp_path, tiny_folder):
    # a diffusers PyTorch folder
    code, _, err = run(capsys, "generate", "a cat", "--backend", "onnxruntime", "--model", str(tiny_folder),
                       "--out", str(tmp_path / "a.png"), "--quiet")
    line = one_line_error(err)
    assert code == 2 and str(tiny_folder) in line and "a diffusers PyTorch folder, not an ONNX export" in line
    assert "missing text_encoder/model.onnx" in line and "fastsd export" in line
    # an empty folder, and a path that does not exist
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "verify", "--backend", "onnxruntime", "--model", str(tmp_path / "empty"), "--quiet")
    assert code == 2 and "not a complete ONNX export: missing model_index.json" in one_line_error(err)
    code, _, err = run(capsys, "verify", "--backend", "onnxruntime", "--model", str(tmp_path / "nope"), "--quiet")
    assert code == 2 and "no such folder" in one_line_error(err)
    with pytest.raises(NotAnExport):
        load_onnx_model(tmp_path / "empty")


def test_model_must_be_fp32_torch(tmp_path, tiny):
    from fastsd import optimize
    from fastsd.errors import InvalidParameter
    optimize(tiny, dtype="bf16")  # the engine converts the model's modules in place
    with pytest.raises(InvalidParameter, match="FP32 on the CPU"):
        export_model(tiny, tmp_path / "x")
    assert not (tmp_path / "x").exists()
