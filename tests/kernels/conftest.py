"""Fixtures for the fastsd.kernels tests.

TRITON_INTERPRET=1 is set by tests/conftest.py, before anything imports triton (see there). With it,
Triton kernels run on CPU tensors in the interpreter. It is process-wide: other tests in the same
session see triton as "available" on CPU, but `auto` never picks the interpreter.
"""

import importlib.util
import os

import pytest
import torch


def _single_threaded_numpy_blas():
    """The Triton interpreter does its tl.dot in numpy. numpy's bundled OpenBLAS spins one thread per
    core; on a shared 2-core machine that made interpreted kernels 5x slower (0.5 s instead of 0.1 s per
    case, measured). numpy is already imported (torch imports it), so the env var alone is too late:
    also call OpenBLAS' own setter in numpy's bundled library, best effort."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import ctypes
        import glob

        import numpy

        libdir = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
        for path in glob.glob(os.path.join(libdir, "libscipy_openblas*.so")):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                        "openblas_set_num_threads"):
                if hasattr(lib, sym):
                    getattr(lib, sym)(1)
                    break
    except Exception:
        pass


_single_threaded_numpy_blas()

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRETING),
    reason="triton not installed (pip install 'fastsd[triton]'); its kernels run on CPU under TRITON_INTERPRET=1"
    if not HAVE_TRITON else "TRITON_INTERPRET was set to something other than 1 before the tests started",
)


def unet_out(unet, inputs):
    sample, t, ehs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ehs).sample


def vae_out(vae, latents):
    with torch.no_grad():
        return vae.decode(latents).sample


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16,
    ).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=64,
    ).eval()


@pytest.fixture(scope="session")
def _tiny_models():
    return tiny_unet(), tiny_vae()


@pytest.fixture
def unet(_tiny_models):
    import copy

    return copy.deepcopy(_tiny_models[0])


@pytest.fixture
def vae(_tiny_models):
    import copy

    return copy.deepcopy(_tiny_models[1])


@pytest.fixture(scope="session")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    return sample, torch.tensor(500), ehs


@pytest.fixture(scope="session")
def vae_latents():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, 8, 8, generator=g)


@pytest.fixture(autouse=True)
def _fresh_registry_state():
    from fastsd.kernels import registry

    registry._reset_for_tests()
    yield
