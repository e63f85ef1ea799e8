import pytest


@pytest.fixture(scope="session")
def tiny_export(_tiny, tmp_path_factory):
    """The tiny model exported once (fp32, dynamic shapes, default ranges): (folder, fastsd_export.json)."""
    from fastsd.export import export_model
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    info = export_model(_tiny, out, progress=False, echo=None)
    return out, info
