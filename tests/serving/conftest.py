import os

import pytest

API_TOKEN = "api-test-token"


@pytest.fixture(scope="session")
def shapes_api_deployment(tmp_path_factory, shapes_lora_dir):
    """One live deployment of the embedded fastsd-shapes model with its REST gateway and a token: the OpenAI
    and A1111 APIs, /score and the comparisons between them share it (a deployment costs ~1 GB and tens of
    seconds of start on this machine). Its --lora-dir offers `speckle` (shapes_lora_dir)."""
    import subprocess
    import sys
    pytest.importorskip("mii")  # the serving extra
    pytest.importorskip("fastapi")
    from fastsd.serving import ports
    cache = tmp_path_factory.mktemp("mii-api")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    port, rest_port = ports.free_port_block(2), ports.free_port_block(1)
    name = f"api{os.getpid()}"
    info = {"name": name, "port": port, "rest_port": rest_port, "cache": cache, "dir": cache / name,
            "url": f"http://127.0.0.1:{rest_port}", "token": API_TOKEN, "lora_dir": str(shapes_lora_dir)}
    argv = ["serve", "--model", "fastsd-shapes", "--deployment", name, "--port", str(port), "--rest-port",
            str(rest_port), "--token", API_TOKEN, "--threads", "1", "--max-batch", "4", "--batch-window-ms", "20",
            "--timeout", "120", "--startup-timeout", "400", "--lora-dir", info["lora_dir"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "fastsd.cli", *argv], capture_output=True, text=True,
                              timeout=450, env=env)
        if proc.returncode != 0:
            raise AssertionError(f"fastsd serve failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield info
    finally:
        from deployment_cleanup import end_deployment
        try:
            end_deployment(name, info["dir"])  # never leave a server behind, whatever happened
        finally:
            if old is None:
                os.environ.pop("MII_CACHE_PATH", None)
            else:
                os.environ["MII_CACHE_PATH"] = old


@pytest.fixture(scope="session")
def shapes_engine():
    """fastsd-shapes as the deployment runs it (torch, fp32): what every door must give, pixel for pixel."""
    from fastsd import load_model, optimize
    return optimize(load_model("fastsd-shapes"), dtype="fp32")
