"""The house rules of docs/architecture.md, checked on the source: imports point down the layers, no import
cycle (imports inside functions count), no library module imports a command-line module, no module over
600 lines. Pure file checks (ast), no imports of fastsd."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package-dir mapping of pyproject.toml: import name -> folder
PACKAGES = {"fastsd": ROOT / "fastsd", "fastsd.kernels": ROOT / "kernels", "fastsd.export": ROOT / "export",
            "fastsd.bench": ROOT / "bench"}
MAX_LINES = 600

# Bottom first: a module may import modules of its own layer or of a layer below, never above.
# Written out in docs/architecture.md; a module not named here by prefix is in "engine".
LAYERS = [
    ("kernels", ("fastsd.kernels", "fastsd.errors")),
    ("models", ("fastsd.model", "fastsd.model_kinds", "fastsd.loading", "fastsd.single_file", "fastsd.presets",
                "fastsd.schedulers", "fastsd.tokenizer", "fastsd.images", "fastsd.validation", "fastsd.lora",
                "fastsd.lora_files", "fastsd.step_cache", "fastsd.tiny_vae")),
    ("graphs", ("fastsd.export",)),
    ("backends", ("fastsd.backends",)),
    ("engine", ()),
    ("front ends", ("fastsd.serving", "fastsd.batch", "fastsd.ui", "fastsd.bench")),
    ("commands", ()),
]
LAYER_NAMES = [name for name, _ in LAYERS]


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if pkg == "fastsd" and parts[0] in ("kernels", "export", "bench"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = path
    return found


MODULES = modules()


def is_command(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("cli", "__main__") or name == "fastsd.options"


def layer(name: str) -> int:
    if is_command(name):
        return LAYER_NAMES.index("commands")
    if name == "fastsd":  # the package's front door re-exports the engine and the drop-in
        return LAYER_NAMES.index("engine")
    best, found = LAYER_NAMES.index("engine"), ""
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > len(found):
                best, found = i, p
    return best


def targets(name: str, path: Path, node) -> list[str]:
    """The fastsd modules an import statement in module `name` loads (a name imported from a package that is
    not a submodule counts as the package)."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for w in wanted:
        while w and w not in MODULES:
            w = w.rpartition(".")[0]
        if w and w != name:
            out.append(w)
    return out


def imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every fastsd-internal import, inside functions too."""
    rows = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                rows += [(name, t, node.lineno) for t in targets(name, path, node)]
    return rows


IMPORTS = imports()


def cycles() -> list[list[str]]:
    graph = {m: set() for m in MODULES}
    for a, b, _ in IMPORTS:
        graph[a].add(b)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_the_whole_tree():
    assert {"fastsd", "fastsd.engine", "fastsd.kernels.registry", "fastsd.export.exporter",
            "fastsd.bench.cli", "fastsd.serving.rest"} <= set(MODULES)
    assert len(MODULES) > 80 and any(a == "fastsd.cli" and b.startswith("fastsd.") for a, b, _ in IMPORTS)


def test_no_import_cycle():
    assert cycles() == []


def test_imports_point_down_the_layers():
    up = [f"{a} ({LAYER_NAMES[layer(a)]}) imports {b} ({LAYER_NAMES[layer(b)]}), line {line}"
          for a, b, line in IMPORTS if layer(b) > layer(a)]
    assert up == []


def test_no_library_module_imports_a_command():
    bad = [f"{a} imports {b}, line {line}" for a, b, line in IMPORTS if is_command(b) and not is_command(a)]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_600_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {n} lines"


def test_the_checker_catches_a_cycle_and_an_upward_import():
    """The checks can fail: a module of the kernels layer importing the engine is both."""
    assert layer("fastsd.kernels.registry") < layer("fastsd.engine") < layer("fastsd.serving.rest") \
        < layer("fastsd.cli")
    extra = ("fastsd.engine", "fastsd.kernels.registry", 0), ("fastsd.kernels.registry", "fastsd.engine", 0)
    IMPORTS.extend(extra)
    try:
        assert any({"fastsd.engine", "fastsd.kernels.registry"} <= set(c) for c in cycles())
        assert any(layer(b) > layer(a) for a, b, _ in IMPORTS)
    finally:
        del IMPORTS[-2:]


def test_every_package_is_listed_for_a_plain_install():
    """pyproject.toml's `packages` names each package folder (a missing one works in an editable install and
    is absent from a wheel)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert folders - listed == set()
