"""A CLIP tokenizer that needs no download, for models built with random weights.

The real CLIP BPE vocabulary (49,408 tokens) is not on PyPI in a form we can depend on, and random
weights make token identity meaningless; what matters for cost is that every prompt becomes 77 ids,
which any CLIP-format vocabulary gives. So we write the byte-level base of CLIP's vocabulary (256 byte
symbols, the same with the end-of-word mark, and the two special tokens) and no merges.
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer


def _byte_symbols() -> list[str]:
    # CLIP (like GPT-2) maps each byte to a printable unicode character before BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_byte_level_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # model_max_length=77: without it the tokenizer has no truncation length (see shared notes).
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


@lru_cache(maxsize=1)
def byte_level_clip_tokenizer() -> CLIPTokenizer:
    folder = write_byte_level_vocab(Path(tempfile.mkdtemp(prefix="fastsd-tok-")))
    return CLIPTokenizer.from_pretrained(str(folder))
