"""mkdocs hook: the README is the site's home page, and files of the repository outside docs/
that a page links to (bench/results/..., deploy/haproxy.cfg) are published with the site.

Every page is written to be read in the repository too (on a git forge or in an editor), so
its links are relative to where the page lives in the repository: README.md links to
`docs/sites.md`, docs/performance.md to `../bench/results/HISTORY.md`. This hook maps those
repository paths onto the site: `docs/X` is the site's `X`, any other file is published as
`repository/<path>`, and each link is rewritten to match. A link to a file that does not exist
is left pointing at a page that is not there, so `mkdocs build --strict` fails on it, as it
does on a broken link between two docs pages (tests/test_docs.py builds the site strictly).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PUBLISHED = "repository/"  # where files from outside docs/ appear in the site
# An inline link or image: [text](target) or [text](target "title"); reference-style links
# are not used in these docs.
LINK = re.compile(r'(\]\(\s*<?)([^)\s>]+)(>?(?:\s+"[^"]*")?\s*\))')
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _repo(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def _origin(file: File, repo: Path) -> str:
    """Where the page's source lives in the repository, e.g. 'docs/sites.md', 'README.md'."""
    assert file.abs_src_path is not None
    return Path(file.abs_src_path).resolve().relative_to(repo).as_posix()


def _target(link: str, origin: str) -> tuple[str, str] | None:
    """The repository path a relative link points at, and its '#anchor' (or '')."""
    if link.startswith(("#", "/")) or SCHEME.match(link):
        return None
    path, hash_, anchor = link.partition("#")
    return posixpath.normpath(posixpath.join(posixpath.dirname(origin), path)), hash_ + anchor


def _site_uri(repo_path: str) -> str:
    if repo_path == "README.md":
        return "index.md"
    if repo_path.startswith("docs/"):
        return repo_path.removeprefix("docs/")
    return PUBLISHED + repo_path


def _outside_code(markdown: str, change: Callable[[str], str]) -> str:
    """Apply `change` to the text between fenced code blocks (links in code stay as written)."""
    out, last = [], 0
    for m in FENCE.finditer(markdown):
        out += [change(markdown[last : m.start()]), m.group(0)]
        last = m.end()
    return "".join([*out, change(markdown[last:])])


def on_files(files: Files, config: Any) -> Files:
    repo = _repo(config)
    if files.get_file_from_path("index.md") is None:
        readme = str(repo / "README.md")
        files.append(File.generated(config, "index.md", abs_src_path=readme))
    pending = list(files.documentation_pages())
    while pending:
        page = pending.pop()
        origin = _origin(page, repo)
        text = FENCE.sub("", Path(str(page.abs_src_path)).read_text(encoding="utf-8"))
        for link in (m.group(2) for m in LINK.finditer(text)):
            target = _target(link, origin)
            if target is None or target[0].startswith("../"):
                continue
            uri = _site_uri(target[0])
            source = repo / target[0]
            new = uri.startswith(PUBLISHED) and files.get_file_from_path(uri) is None
            if new and source.is_file():
                published = File.generated(config, uri, abs_src_path=str(source))
                files.append(published)
                if published.is_documentation_page():
                    pending.append(published)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    repo = _repo(config)
    origin = _origin(page.file, repo)
    here = posixpath.dirname(page.file.src_uri)

    def relink(m: re.Match[str]) -> str:
        target = _target(m.group(2), origin)
        if target is None or target[0].startswith("../"):
            return m.group(0)
        uri = posixpath.relpath(_site_uri(target[0]), here or ".")
        return m.group(1) + uri + target[1] + m.group(3)

    return _outside_code(markdown, lambda text: LINK.sub(relink, text))
