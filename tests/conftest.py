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
if "FASTSD_OPENVINO_CACHE" not in os.environ:  # removed at exit: each session's exports and int8 UNets add up
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    os.environ["FASTSD_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="fastsd-test-openvino-")
    atexit.register(shutil.rmtree, os.environ["FASTSD_OPENVINO_CACHE"], ignore_errors=True)


# The session's live deployments: each starts once per worker process that runs a test needing it.
SHARED_DEPLOYMENTS = ("shapes_deployment", "shapes_api_deployment")


def pytest_collection_modifyitems(config, items):
    """`make test` runs on two workers (pytest-xdist, --dist loadgroup). Each test module stays on one worker,
    so a module-scoped deployment starts once, and every test of one shared deployment runs on one worker,
    so a session-scoped deployment starts once too."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        shared = [name for name in SHARED_DEPLOYMENTS if name in item.fixturenames]
        group = shared[0] if shared else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


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


@pytest.fixture(scope="session")
def shapes_lora_dir(tmp_path_factory):
    """A folder with one LoRA for fastsd-shapes, `speckle` (random factors, strong enough to change its images)."""
    from fastsd import load_model
    from fastsd.lora_files import random_factors, save_diffusers_layout
    folder = tmp_path_factory.mktemp("shapes-loras")
    save_diffusers_layout(random_factors(load_model("fastsd-shapes"), rank=4, seed=1, std=0.3),
                          folder / "speckle.safetensors")
    return folder


@pytest.fixture(scope="session")
def shared_mii_cache(tmp_path_factory):
    """The one MII cache folder (MII_CACHE_PATH) of the session's shared deployments: each deployment fixture
    is alive until the session ends, so each setting its own folder in the environment hid the others from
    `fastsd status`/clients that read MII_CACHE_PATH."""
    cache = tmp_path_factory.mktemp("mii-shared")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MII_CACHE_PATH", None)
    else:
        os.environ["MII_CACHE_PATH"] = old


@pytest.fixture(scope="session")
def shapes_deployment(shared_mii_cache, shapes_lora_dir):
    """One live deployment of the embedded fastsd-shapes model with its web page (`fastsd serve --ui-port`),
    shared by the web page and batch tests (each serving process costs ~350 MB and seconds of imports).
    Its --lora-dir offers one adapter, `speckle` (shapes_lora_dir)."""
    import subprocess
    import sys
    pytest.importorskip("mii")  # the serving extra
    from fastsd.serving import ports
    cache = shared_mii_cache
    port, ui_port = ports.free_port_block(2), ports.free_port_block(1)
    name = f"shapes{os.getpid()}"
    info = {"name": name, "port": port, "ui_port": ui_port, "cache": cache, "dir": cache / name,
            "url": f"http://127.0.0.1:{ui_port}/",
            "lora_dir": str(shapes_lora_dir)}
    argv = ["serve", "--model", "fastsd-shapes", "--deployment", name, "--port", str(port), "--threads", "1",
            "--max-batch", "4", "--batch-window-ms", "50", "--timeout", "120", "--startup-timeout", "400",
            "--lora-dir", info["lora_dir"]]
    import importlib.util
    if importlib.util.find_spec("gradio") is not None:  # the ui extra; the batch tests need no page
        argv += ["--ui-port", str(ui_port)]
    else:
        info["url"] = None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "fastsd.cli", *argv], capture_output=True, text=True,
                              timeout=450, env=env)
        if proc.returncode != 0:
            raise AssertionError(f"fastsd serve failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield info
    finally:
        from deployment_cleanup import end_deployment
        end_deployment(name, info["dir"])  # never leave a server behind, whatever happened


@pytest.fixture(scope="session")
def tiny_vae_folder(tmp_path_factory):
    """A tiny VAE (diffusers' AutoencoderTiny, TAESD layout) with seeded random weights that fits the tiny
    model (4 latent channels, 8x: four blocks), written by save_pretrained: what --vae-tiny loads."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4).eval()
    path = tmp_path_factory.mktemp("vae") / "tiny-taesd"
    vae.save_pretrained(path, safe_serialization=True)
    return path


def _saved(tmp_path_factory, preset: str, task: str = "text2img"):
    from fastsd.loading import build_random
    from fastsd.presets import PRESETS
    model = build_random(PRESETS[preset], seed=0)
    path = tmp_path_factory.mktemp("models") / preset
    model.to_pipeline(task=task).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_depth_folder(tmp_path_factory):
    """tiny-depth written by diffusers (StableDiffusionDepth2ImgPipeline: 5-channel UNet, a tiny DPT estimator)."""
    return _saved(tmp_path_factory, "tiny-depth")


@pytest.fixture(scope="session")
def tiny_upscaler_folder(tmp_path_factory):
    """tiny-upscaler written by diffusers (StableDiffusionUpscalePipeline: 7-channel UNet, low_res_scheduler)."""
    return _saved(tmp_path_factory, "tiny-upscaler")


@pytest.fixture(scope="session")
def tiny_inpaint_folder(tmp_path_factory):
    """tiny-inpainting saved by diffusers as StableDiffusionInpaintPipeline (9-channel UNet), as SD 2's is."""
    return _saved(tmp_path_factory, "tiny-inpainting", task="inpaint")
