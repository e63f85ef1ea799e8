"""LoRA adapters a deployment offers (`fastsd serve --lora-dir DIR`) and the `lora` request keyword.

A request names adapters by file name in DIR, never by path: `lora="name"`, `"name:0.8"` or
`"a:0.8,b:0.5"` (MII query keyword values are plain strings; REST takes the same in `parameters`).
Anything else (a path, an unknown name, a bad scale) is an InvalidParameter, which the replica answers
with gRPC INVALID_ARGUMENT and the REST gateway with HTTP 422.

A file that is not a readable .safetensors file is listed as invalid, with why, and not offered; one
that reads but does not load as a LoRA of the model (found when a request first uses it) is marked
invalid then, and that request and every later one naming it get the same 422 naming the adapter.
Messages name adapters, never paths."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidParameter
from ..validation import MAX_LORA_SCALE as MAX_SCALE
from ..validation import lora_scale as check_scale

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_LORAS = 4  # adapters per request


class LoraCatalog:
    """The `.safetensors` files of one folder, by name (the file name without `.safetensors`)."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise InvalidParameter("lora-dir", str(folder), "an existing folder of LoRA .safetensors files")
        self.files = {p.stem: p for p in sorted(self.folder.glob("*.safetensors"))
                      if p.is_file() and NAME.fullmatch(p.stem)}
        self.invalid = {n: why for n, p in self.files.items() if (why := header_problem(p))}  # name -> why

    def names(self) -> list[str]:
        """The adapters offered: every file but the invalid ones."""
        return sorted(n for n in self.files if n not in self.invalid)

    def describe(self) -> dict:
        return {"offered": self.names(), "invalid": dict(sorted(self.invalid.items()))}

    def broken(self, error: Exception, parsed) -> InvalidParameter:
        """A LoRA set that failed to load (fastsd.lora.LoraError): marks the adapter at fault invalid (by the
        path its error names) and returns the request's error, naming the adapter, not the path."""
        text = str(error)
        name = next((n for n, _ in parsed if str(self.files[n]) in text), parsed[0][0])
        why = text.replace(str(self.files[name]), name).removeprefix("lora: ").removeprefix(f"{name}: ")
        self.invalid[name] = why[:300]
        return self._refuse(name)

    def _refuse(self, name: str) -> InvalidParameter:
        offered = ", ".join(self.names()) or "none"
        return InvalidParameter("lora", name, f"a usable adapter; {name} is invalid ({self.invalid[name]}); "
                                              f"offered: {offered}")

    def path(self, name: str) -> Path:
        return self.files[name]

    def parse(self, value) -> tuple[tuple[str, float], ...]:
        """`lora` keyword -> ((name, scale), ...) sorted by name, so equal sets get equal batch keys."""
        if not isinstance(value, str):
            raise InvalidParameter("lora", value, "text: NAME[:SCALE][,NAME[:SCALE]...]")
        out = {}
        items = [s.strip() for s in value.split(",") if s.strip()]
        if len(items) > MAX_LORAS:
            raise InvalidParameter("lora", value, f"at most {MAX_LORAS} adapters per request")
        for item in items:
            name, sep, scale = item.partition(":")
            name = name.strip()
            if not NAME.fullmatch(name) or name not in self.files:
                allowed = ", ".join(self.names()) or "none (the folder has no .safetensors files)"
                raise InvalidParameter("lora", name, f"a LoRA name of this deployment: {allowed}")
            if name in self.invalid:
                raise self._refuse(name)
            if sep and not scale.strip():
                raise InvalidParameter("lora scale", scale, f"a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
            out[name] = check_scale(scale.strip()) if sep else 1.0
        return tuple(sorted(out.items()))

    def refs(self, parsed) -> list[tuple[str, float]]:
        """(path, scale) pairs for Engine.set_loras."""
        return [(str(self.files[n]), s) for n, s in parsed]


def header_problem(path: Path) -> str | None:
    """Why `path` is not a readable .safetensors file with tensors (its header only), or None."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            if not list(f.keys()):
                return "the file holds no tensors"
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for a broken header
        return "not a readable .safetensors file"
    return None
