"""LoRA adapters a deployment offers (`fastsd serve --lora-dir DIR`) and the `lora` request keyword.

A request names adapters by file name in DIR, never by path: `lora="name"`, `"name:0.8"` or
`"a:0.8,b:0.5"` (MII query keyword values are plain strings; REST takes the same in `parameters`).
Anything else (a path, an unknown name, a bad scale) is an InvalidParameter, which the replica answers
with gRPC INVALID_ARGUMENT and the REST gateway with HTTP 422."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidParameter
from ..lora import MAX_SCALE, check_scale

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

    def names(self) -> list[str]:
        return sorted(self.files)

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
            if sep and not scale.strip():
                raise InvalidParameter("lora scale", scale, f"a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
            out[name] = check_scale(scale.strip()) if sep else 1.0
        return tuple(sorted(out.items()))

    def refs(self, parsed) -> list[tuple[str, float]]:
        """(path, scale) pairs for Engine.set_loras."""
        return [(str(self.files[n]), s) for n, s in parsed]
