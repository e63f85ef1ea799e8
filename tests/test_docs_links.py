"""Every relative link in README.md and docs/*.md points at a file in the repository, and a link to a heading
(`page.md#anchor`) at a heading that exists under both GitHub's and MkDocs' rules for anchors. Pure file
checks: fast, no MkDocs needed (`make docs` builds the site with --strict)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text without code (fenced blocks, code spans), where a `[x](y)` is not a link."""
    text = _FENCE.sub("", text)
    return _CODE_SPAN.sub("", text)


def links(text: str) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(text))]


def _heading_text(raw: str) -> str:
    raw = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", raw)  # a link in a heading: its text
    return raw.replace("`", "").replace("*", "")


def github_slug(heading: str) -> str:
    s = _heading_text(heading).strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    # Python-Markdown's toc.slugify, MkDocs' default
    s = re.sub(r"[^\w\s-]", "", _heading_text(heading)).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


def anchors(path: Path) -> set[str]:
    """Anchors that work both on a repository browser and on the MkDocs site."""
    heads = _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))
    return {github_slug(h) for h in heads} & {mkdocs_slug(h) for h in heads}


def broken_links(page: Path) -> list[str]:
    problems = []
    for url in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("//"):
            continue  # http:, https:, mailto: ...: not a file here
        path, _, anchor = url.partition("#")
        if url.startswith("/"):
            problems.append(f"{url}: absolute path (write it relative to {page.name})")
            continue
        target = (page.parent / path).resolve() if path else page
        try:
            target.relative_to(ROOT)
        except ValueError:
            problems.append(f"{url}: outside the repository")
            continue
        if not target.exists():
            problems.append(f"{url}: no such file ({target.relative_to(ROOT)})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{url}: no heading '#{anchor}' in {target.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    assert page.is_file()
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(problems)


def test_the_check_finds_links():
    """The checker sees links in prose and not in code, and reports a missing file or heading."""
    text = "see [a](docs/x.md) and `[b](nope.md)`\n\n```\n[c](nope.md)\n```\n![img](pic.png \"t\")"
    assert links(text) == ["docs/x.md", "pic.png"]
    assert github_slug("The CPU fast path: `--dtype bf16`") != mkdocs_slug("The CPU fast path: `--dtype bf16`")
    assert github_slug("int8, measured in a second run") == mkdocs_slug("int8, measured in a second run")
    assert any("README.md" in str(p) for p in PAGES) and len(PAGES) > 5


def test_the_check_reports_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## Some section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](a.md#some-section) [x](missing.md) [y](a.md#nope) [z](https://example.com)\n")
    found = broken_links(page)
    assert len(found) == 2 and "missing.md" in found[0] and "#nope" in found[1]


if __name__ == "__main__":  # python tests/test_docs_links.py: the same check, as a script
    bad = {str(p.relative_to(ROOT)): broken_links(p) for p in PAGES}
    bad = {k: v for k, v in bad.items() if v}
    for page, problems in bad.items():
        print(page, *problems, sep="\n  ")
    print(f"{len(PAGES)} pages, {sum(map(len, bad.values()))} broken links")
    sys.exit(1 if bad else 0)
