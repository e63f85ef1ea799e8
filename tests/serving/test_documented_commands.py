"""Every deployment command the README and the serving docs show, run as written against a live deployment
(issue 24, item 1: `fastsd ui`, `fastsd serve --ui-port` and `fastsd batch --deployment` once crashed with
the default `--max-batch auto`). The commands are read from the pages' code blocks, so a new one is tested
without editing this file; only names, ports and the model are rewritten (the model to fastsd-shapes, which
the LoRA and page examples use, names to this test's deployment, ports to free ones), and files the
commands read (prompts, images, the LoRA the docs make with their own command) are made in a scratch folder
that is the commands' working directory.

One deployment serves them all, started with the union of the documented `serve` flags that run on one
machine (README's --replicas 2 --rest-port, production's --log-format json, the page's --ui-port, LoRA's
--lora-dir), everything else at its default (`--max-batch auto` included). The `serve` lines that need
what this machine lacks are listed in ELSEWHERE with the test that covers them. Slow: two replicas measure
their batch sizes at start-up."""
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deployment_cleanup import end_deployment
from fastsd.serving import ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *(ROOT / "docs" / f for f in ("serving.md", "production.md", "batch.md", "web-ui.md",
                                                            "lora.md"))]
NAMES = {"sd15", "shapes", "tiny", "tinyurl", "NAME"}
UNION = {"--replicas", "--rest-port", "--log-format", "--ui-port", "--lora-dir", "--model", "--deployment"}
ELSEWHERE = {"--hostfile": "tests/serving/test_serving_multihost.py (network namespaces, root)",
             "--image-url-allow": "tests/serving/test_image_urls.py",
             "--backend": "tests/backends (the openvino export)"}
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def documented() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for block in re.findall(r"```(?:sh|console|bash)\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ ").strip())
                if re.match(r"fastsd (serve|query|status|stop|batch|ui)\b|python -c .*fastsd\.serving", line):
                    if line.startswith("fastsd batch") and "--deployment" not in line:
                        continue  # the local engine: tests/batch
                    out.append((page.name, line))
    return out


def rewrite(line: str, name: str, port_of) -> list[str]:
    words = shlex.split(line)
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w in ("--port", "--rest-port", "--ui-port", "--metrics-port") and i + 1 < len(words):
            page_of_its_own = words[:2] == ["fastsd", "ui"]  # `fastsd ui --port`: the page's own port
            out += [w, str(ports.free_port_block(1) if page_of_its_own else port_of(w))]
            i += 2
            continue
        if w == "--model" and i + 1 < len(words):
            out += [w, "fastsd-shapes"]
            i += 2
            continue
        out.append(name if w in NAMES else w.replace('"sd15"', f'"{name}"'))
        i += 1
    if out[0] == "fastsd":
        out = [sys.executable, "-m", "fastsd.cli", *out[1:]]
    elif out[0] == "python":
        out = [sys.executable, *out[1:]]
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from PIL import Image, ImageDraw
    cwd = tmp_path_factory.mktemp("docs-cwd")
    (cwd / "out").mkdir()
    img = Image.new("RGB", (64, 64), "blue")
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill="red")
    img.save(cwd / "out" / "circle.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 32, 32), fill=255)
    mask.save(cwd / "out" / "corner.png")
    (cwd / "prompts").mkdir()
    (cwd / "prompts" / "a.csv").write_text("prompt\na red circle on a blue background\na green square on a white background\n")
    for page in PAGES:  # the LoRA the docs make, with their own command
        for line in re.findall(r"^python -m fastsd\.lora_files .*?(?=\s+#|$)", page.read_text(), re.M):
            p = subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=cwd, capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, **ENV))
            assert p.returncode == 0, (line, p.stderr[-2000:])
    return cwd


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, scratch):
    cache = tmp_path_factory.mktemp("mii")
    old = os.environ.get("MII_CACHE_PATH")
    os.environ["MII_CACHE_PATH"] = str(cache)
    name = f"docs{os.getpid()}"
    base = ports.free_port_block(3)
    fixed = {"--port": base, "--rest-port": ports.free_port_block(1), "--ui-port": ports.free_port_block(1),
             "--metrics-port": ports.free_port_block(1)}
    info = {"name": name, "dir": cache / name, "ports": fixed, "port_of": lambda flag: fixed[flag]}
    try:
        yield info
    finally:
        try:
            end_deployment(name, info["dir"])
        finally:
            if old is None:
                os.environ.pop("MII_CACHE_PATH", None)
            else:
                os.environ["MII_CACHE_PATH"] = old


def run(argv, cwd, timeout=600):
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **ENV))
    return p.returncode, p.stdout + p.stderr


def test_every_documented_deployment_command_runs(deployment, scratch):
    lines = documented()
    assert any(line.startswith("fastsd ui") for _, line in lines) and any("--deployment" in line for _, line in lines)
    serves = [(page, line) for page, line in lines if line.startswith("fastsd serve")]
    flags = set()
    for page, line in serves:
        words = {w for w in shlex.split(line) if w.startswith("--")}
        away = [f for f in words if f in ELSEWHERE]
        if away:
            continue  # needs what this machine lacks; covered by ELSEWHERE's test
        assert words <= UNION | {"--port"}, f"{page}: {line}: flags {words - UNION} are not started by this test"
        flags |= words
    assert {"--replicas", "--rest-port", "--ui-port", "--lora-dir"} <= flags
    serve = [sys.executable, "-m", "fastsd.cli", "serve", "--model", "fastsd-shapes", "--deployment",
             deployment["name"], "--replicas", "2", "--port", str(deployment["ports"]["--port"]),
             "--rest-port", str(deployment["ports"]["--rest-port"]), "--log-format", "json",
             "--ui-port", str(deployment["ports"]["--ui-port"]), "--lora-dir", "out/loras", "--startup-timeout", "1200"]
    code, text = run(serve, scratch, timeout=1300)
    assert code == 0, text
    stops = []
    for page, line in lines:
        if line.startswith("fastsd serve"):
            continue
        argv = rewrite(line, deployment["name"], deployment["port_of"])
        if line.startswith(("fastsd stop", "python -c")):
            stops.append((page, line, argv))
            continue
        if line.startswith("fastsd ui"):
            proc = subprocess.Popen(argv, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **ENV))
            try:
                port = int(argv[argv.index("--port") + 1])
                end = time.monotonic() + 300
                while not ports.port_answers(port) and proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.5)
                assert proc.poll() is None, f"{page}: {line} exited {proc.returncode}: {proc.stdout.read()[-2000:]}"
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).status == 200
            finally:
                proc.terminate()
                proc.wait(30)
            continue
        code, text = run(argv, scratch)
        assert code == 0, f"{page}: {line}\n-> {shlex.join(argv)}\n{text[-3000:]}"
    page_port = deployment["ports"]["--ui-port"]  # `serve --ui-port`: the page the deployment started
    assert urllib.request.urlopen(f"http://127.0.0.1:{page_port}/", timeout=30).status == 200
    assert (scratch / "out" / "batch" / "predictions.csv").exists()
    for page, line, argv in stops:  # last: the deployment's end, both ways the README shows
        code, text = run(argv, scratch, timeout=120)
        assert code == 0, f"{page}: {line}\n{text[-2000:]}"
