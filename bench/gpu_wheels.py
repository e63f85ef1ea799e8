"""`make gpu-wheels`: the wheels fastsd's GPU self-check needs beyond a CUDA torch, for a machine that has a GPU,
a CUDA torch and no package index.

    python -m fastsd.bench.gpu_wheels --out out/gpu-wheels [--python-version 3.11] [--limit-mb 60]
    python -m fastsd.bench.gpu_wheels --check out/gpu-wheels [--torch torch==2.13.0]

What goes in, in this order, while the total stays within --limit-mb:
  core      fastsd, built from this checkout without its embedded fastsd-shapes weights (10 MB; fastsd then
            defaults to the random `tiny` model, and so does gpu_check; --with-model keeps them), and what it
            imports at run time: diffusers, transformers, tokenizers, safetensors, huggingface_hub, numpy,
            pillow, tqdm and their dependencies, at the versions constraints.txt pins; less what torch itself
            depends on (a CUDA torch brings them) and less the command-line and download extras fastsd never
            imports (UNUSED);
  optional  onnx with onnxruntime-gpu (the onnxruntime section needs both), then triton (the version
            constraints.txt pins; a CUDA torch from PyPI depends on its own matching triton anyway): each group
            only if it still fits, else listed as left out with its measured size.
`requirements.txt` pins every wheel in the folder and `manifest.json` lists sizes and what was left out.
Install there with

    pip install --no-index --find-links out/gpu-wheels --no-deps -r out/gpu-wheels/requirements.txt

(--no-deps: fastsd declares accelerate and scipy, which it does not import; diffusers uses scipy for the LMS
scheduler only). `--check` does exactly that in a new virtual environment beside a torch (`--torch`, from
this machine's index) and runs a tiny generation and `gpu_check --quick` there.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "numpy", "pillow", "tqdm"]
OPTIONAL = [("onnx + onnxruntime-gpu", ["onnx", "onnxruntime-gpu"]), ("triton", ["triton"])]
# dependencies of huggingface_hub and transformers that neither fastsd nor gpu_check imports: their command
# lines (typer, click, rich, ...), xet downloads (hf-xet; nothing downloads here), pydantic (serve's schema
# only). `--check` runs fastsd without them.
UNUSED = {"hf-xet", "typer", "typer-slim", "click", "rich", "pygments", "markdown-it-py", "mdurl", "shellingham",
          "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "annotated-doc", "lazy-importer"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalized project name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def torch_closure() -> set[str]:
    """torch and everything it depends on, from the installed distributions' metadata (what a CUDA torch's
    environment already has; its nvidia-* and triton packages aside, the same on CPU)."""
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if norm(name) in seen:
            continue
        seen.add(norm(name))
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return seen


def pip(*args: str, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    subprocess.run(cmd, check=True)


def download(packages: list[str], dest: Path, python_version: str, constraints: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--only-binary=:all:", *plats, "--python-version", python_version, "--implementation", "cp",
        "-c", str(constraints), "-d", str(dest), *packages)
    return sorted(dest.glob("*.whl"))


def mb(n: int) -> float:
    return round(n / 1e6, 2)


def fastsd_source(work: Path, with_model: bool) -> Path:
    """This checkout (without the embedded model's folder unless `with_model`), as pip builds it."""
    if with_model:
        return ROOT
    model = ROOT / "fastsd" / "models" / "fastsd-shapes"

    def ignore(folder, names):
        skip = {".git", ".venv", "out", "build", "site", "__pycache__", ".pytest_cache"}
        return [n for n in names if n in skip or n.endswith(".egg-info") or Path(folder, n) == model]
    return Path(shutil.copytree(ROOT, work / "src", ignore=ignore))


def build(out: Path, python_version: str, limit_mb: float, constraints: Path, with_model: bool = False) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    drop = torch_closure() | UNUSED
    work = Path(tempfile.mkdtemp(prefix="fastsd-wheels-"))
    try:
        pip("wheel", "--no-deps", "-w", str(out), str(fastsd_source(work, with_model)))
        kept: dict[str, Path] = {wheel_name(p)[0]: p for p in out.glob("*.whl")}
        left_out = []
        for p in download(CORE, work / "core", python_version, constraints):
            name = wheel_name(p)[0]
            if name in drop:
                left_out.append({"wheel": p.name, "mb": mb(p.stat().st_size),
                                 "why": "torch depends on it" if name in torch_closure() else "not imported by fastsd"})
            elif name not in kept:
                shutil.copy2(p, out / p.name)
                kept[name] = out / p.name
        total = sum(p.stat().st_size for p in kept.values())
        if total > limit_mb * 1e6:
            raise SystemExit(f"gpu-wheels: the core alone is {mb(total)} MB, over --limit-mb {limit_mb}")
        for group, packages in OPTIONAL:
            new = [p for p in download(packages, work / group, python_version, constraints)
                   if wheel_name(p)[0] not in kept and wheel_name(p)[0] not in drop]
            size = sum(p.stat().st_size for p in new)
            if total + size <= limit_mb * 1e6:
                for p in new:
                    shutil.copy2(p, out / p.name)
                    kept[wheel_name(p)[0]] = out / p.name
                total += size
            else:
                left_out.append({"wheel": ", ".join(p.name for p in new), "mb": mb(size),
                                 "why": f"{group} does not fit: {mb(total)} + {mb(size)} MB > {limit_mb} MB"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pins = sorted(f"{n}=={wheel_name(p)[1]}" for n, p in kept.items())
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    manifest = {"python_version": python_version, "platforms": list(PLATFORMS), "limit_mb": limit_mb,
                "fastsd_embedded_model": with_model,
                "total_mb": mb(total), "wheels": {p.name: mb(p.stat().st_size) for p in sorted(kept.values())},
                "left_out": left_out,
                "install": f"pip install --no-index --find-links {out} --no-deps -r {out}/requirements.txt"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


SMOKE = """
import torch
from fastsd import optimize
from fastsd.loading import load_model
engine = optimize(load_model("tiny", random_weights=True), safety_checker=False,
                  device="cuda" if torch.cuda.is_available() else "cpu")
result = engine.generate(["a red circle"], num_inference_steps=2, seed=0, progress=False)
print("smoke: generated", result.images[0].size, "on", engine.describe()["device"])
"""


def check(folder: Path, torch_spec: str, venv: Path) -> int:
    """Install the wheelhouse as the docs say into a new venv beside `torch_spec`, then run fastsd there (from
    inside the venv's folder, so that this checkout's own fastsd/ is not what gets imported)."""
    folder, venv = folder.resolve(), venv.resolve()
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")

    def run(*args, **kw):
        return subprocess.run([py, *args], cwd=venv, **kw)
    run("-m", "pip", "install", "-q", torch_spec, check=True)
    run("-m", "pip", "install", "-q", "--no-index", "--find-links", str(folder), "--no-deps",
        "-r", str(folder / "requirements.txt"), check=True)
    run("-c", SMOKE, check=True)
    rc = run("-m", "fastsd.bench.gpu_check", "--quick", "--out", str(venv / "gpu_check"), "--budget-s", "300").returncode
    missing = run("-m", "pip", "check", capture_output=True, text=True).stdout.strip()
    print("pip check (fastsd's declared accelerate and scipy are left out on purpose):\n" + (missing or "ok"))
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.gpu_wheels", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu-wheels")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the GPU machine's Python (binary wheels are per version; default: this one's)")
    p.add_argument("--limit-mb", type=float, default=60.0)
    p.add_argument("--constraints", default=str(ROOT / "constraints.txt"))
    p.add_argument("--with-model", action="store_true", help="keep fastsd's embedded fastsd-shapes weights (10 MB)")
    p.add_argument("--check", metavar="FOLDER", help="install FOLDER into a new venv and run fastsd there")
    p.add_argument("--torch", default=None, help="what --check installs first (default: this torch's version)")
    p.add_argument("--venv", default="out/gpu-wheels-check", help="the venv --check makes (removed first)")
    args = p.parse_args(argv)
    if args.check:
        spec = args.torch or f"torch=={importlib.metadata.version('torch')}"
        return check(Path(args.check), spec, Path(args.venv))
    m = build(Path(args.out), args.python_version, args.limit_mb, Path(args.constraints), args.with_model)
    for name, size in m["wheels"].items():
        print(f"{size:8.2f} MB  {name}")
    for item in m["left_out"]:
        print(f"left out: {item['wheel']} ({item['mb']} MB): {item['why']}")
    print(f"gpu-wheels: {len(m['wheels'])} wheels, {m['total_mb']} MB (limit {args.limit_mb:g} MB) in {args.out}\n"
          f"install: {m['install']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
