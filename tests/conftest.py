import copy
import os

# Triton decides interpreted or compiled when `triton.language` is first imported, and importing
# diffusers' models imports triton where it is installed. So TRITON_INTERPRET=1 goes here, before any
# test module imports fastsd, or the kernel tests fail with "Cannot call @triton.jit'd outside of the
# scope of a kernel" whenever another test module is collected first. `auto` never picks the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from more; avoids oversubscribing a shared machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# the openvino backend's compiled models and on-the-fly exports go to a folder of this session, not ~/.cache
import tempfile  # noqa: E402
os.environ.setdefault("FASTSD_OPENVINO_CACHE", tempfile.mkdtemp(prefix="fastsd-test-openvino-"))


@pytest.fixture(scope="session")
def _tiny():
    from fastsd.loading import build_random
    from fastsd.presets import TINY
    return build_random(TINY, seed=0)


@pytest.fixture
def tiny(_tiny):
    """A fresh tiny model (random weights, SD architecture) that a test may hand to `optimize`."""
    return copy.deepcopy(_tiny)


@pytest.fixture(scope="session")
def tiny_folder(_tiny, tmp_path_factory):
    """The tiny model written by diffusers' save_pretrained: a real local diffusers folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    _tiny.to_pipeline().save_pretrained(path, safe_serialization=True)
    return path
