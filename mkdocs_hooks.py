"""MkDocs hook (mkdocs.yml `hooks:`; a core MkDocs feature, no plugin): puts a few files that live outside
docs/ on the site, so the docs link to them where they are kept instead of copying them.

docs/*.md link to them by their path in the repository (`../bench/RESULTS.md#anchor`), which works on a
repository browser and in tests/test_docs_links.py; here those links are rewritten to the file's place on
the site. The measurements stay only in bench/RESULTS.md."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
# Files outside docs/ that the site carries, by their path in the repository (listed in mkdocs.yml's nav).
REPO_FILES = (
    "bench/RESULTS.md",
    "bench/RESULTS-accelerate.md",
    "kernels/README.md",
    "fastsd/models/fastsd-shapes/README.md",
    "fastsd/models/loras/README.md",
)
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def on_files(files, config):
    for path in REPO_FILES:
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def _repo_path(page_src_uri: str) -> str:
    """Where a page's source lives in the repository."""
    return page_src_uri if page_src_uri in REPO_FILES else "docs/" + page_src_uri


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(_repo_path(page.file.src_uri))
    site_dir = posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match) -> str:
        url = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", url):
            return m.group(0)
        path, hash_, anchor = url.partition("#")
        target = posixpath.normpath(posixpath.join(here, path))
        if target in REPO_FILES:
            site_target = target
        elif target.startswith("docs/"):
            site_target = target[len("docs/"):]
        else:
            return m.group(0)  # left as written: mkdocs --strict reports it
        new = posixpath.relpath(site_target, site_dir or ".")
        return m.group(1) + new + hash_ + anchor + m.group(3)

    return _LINK.sub(fix, markdown)
