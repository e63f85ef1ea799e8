"""The deployment spec (fastsd/serving/spec.py): typed, checked once when read, versioned; and the MII
record names of a deployment (records.py), derived in one place."""
import json

import pytest

from fastsd.serving.errors import ServingError
from fastsd.serving.records import IMAGE_TASK, TEXT_TO_IMAGE, record_name
from fastsd.serving.request import Limits
from fastsd.serving.spec import SPEC_VERSION, DeploymentSpec, ReplicaPlacement


def spec() -> DeploymentSpec:
    return DeploymentSpec(name="dep", model="tiny", port=50050, rest_port=50060,
                          replicas=[ReplicaPlacement(index=0, host="127.0.0.1", port=50051, bind="127.0.0.1",
                                                     cuda_visible_devices="0,1")],
                          limits=Limits(max_steps=20, image_url_allow=("https://images.example.com/",)),
                          loras=[("/loras/a.safetensors", 0.8)])


def test_written_spec_reads_back_equal_with_its_version(tmp_path):
    spec().write(tmp_path)
    data = json.loads((tmp_path / "spec.json").read_text())
    assert data["version"] == SPEC_VERSION and data["limits"]["max_steps"] == 20
    assert DeploymentSpec.read(tmp_path) == spec()
    assert spec().local_ports() == [50050, 50051, 50060]


def test_a_spec_without_a_version_is_read_as_before(tmp_path):
    data = spec().to_dict()
    del data["version"]
    data["a_key_an_older_fastsd_wrote"] = 1  # ignored in a file from before versions
    (tmp_path / "spec.json").write_text(json.dumps(data))
    assert DeploymentSpec.read(tmp_path) == spec()


def test_a_newer_version_is_a_clear_error(tmp_path):
    data = {**spec().to_dict(), "version": SPEC_VERSION + 1}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(ServingError, match=f"version {SPEC_VERSION + 1} was written by a newer fastsd"):
        DeploymentSpec.read(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"port": "50050"}, "port: got '50050'; expected int"),
    ({"max_batch": "many"}, "max_batch: got 'many'"),
    ({"limits": {"max_steps": 1.5}}, "limits: max_steps: got 1.5; expected int"),
    ({"replicas": [{"index": 0}]}, "replicas\\[0\\]: host is missing"),
    ({"unknown": 1}, "unknown key 'unknown'"),
    ({"name": "a b"}, "name: got 'a b'"),
])
def test_a_bad_field_is_named(tmp_path, change, message):
    (tmp_path / "spec.json").write_text(json.dumps({**spec().to_dict(), **change}))
    with pytest.raises(ServingError, match=message):
        DeploymentSpec.read(tmp_path)


def test_no_spec_file_is_none(tmp_path):
    assert DeploymentSpec.read(tmp_path) is None


def test_record_names():
    assert record_name("dep") == record_name("dep", TEXT_TO_IMAGE) == "dep"
    assert record_name("dep", IMAGE_TASK) == "dep-inpaint"
    with pytest.raises(ValueError):
        record_name("dep", "text-generation")


def test_images_per_call_with_auto_is_the_limit():
    """Front doors size their requests in flight from it (replicas x images per call): "auto" is no number."""
    assert DeploymentSpec(name="d", model="m", max_batch="auto", max_batch_limit=6).max_images_per_call == 6
    assert DeploymentSpec(name="d", model="m", max_batch=3, max_batch_limit=6).max_images_per_call == 3
