"""mkdocs hooks (mkdocs.yml): pages built from the repository's own files.

The site's home page is README.md and its changelog is CHANGELOG.md, both at the root of
the repository, and pages link to repository files outside docs/ (the examples, the
benchmark results). Links are written for GitHub, relative to the file that holds them;
here each one is rewritten to where the target is served on the site:

- ``docs/X`` is the page ``X``; ``README.md`` is ``index.md``, ``CHANGELOG.md`` is
  ``changelog.md``;
- any other repository file is served under ``repo/`` (a Markdown one as a page).

A link to a file that does not exist is left for ``mkdocs build --strict`` to report.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
#: Site pages made from files at the root of the repository.
ROOT_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
#: Where other repository files that pages link to are served.
REPO = "repo"
#: An inline link or image target: ``](target#anchor)`` or ``](target "title")``.
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<rest>[^)]*)\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
#: Fenced code blocks and inline code, where ``](`` is code, not a link.
CODE = re.compile(r"^(?P<fence>```|~~~).*?^(?P=fence)|`[^`\n]+`", re.MULTILINE | re.DOTALL)

#: The repository path each site page was made from.
_origins: dict[str, str] = {}


def _site_path(repo_path: str) -> str:
    """Where the repository file at `repo_path` is on the site."""
    if repo_path.startswith("docs/"):
        return repo_path.removeprefix("docs/")
    return ROOT_PAGES.get(repo_path, f"{REPO}/{repo_path}")


def _targets(markdown: str, origin: str) -> list[tuple[re.Match[str], str]]:
    """The relative links of a page made from `origin`, with their repository paths."""
    code = [span.span() for span in CODE.finditer(markdown)]
    found = []
    for match in LINK.finditer(markdown):
        target = match["target"]
        if SCHEME.match(target) or target.startswith("/"):
            continue
        if any(start <= match.start() < end for start, end in code):
            continue
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(origin), target))
        found.append((match, repo_path))
    return found


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the pages made from README.md and CHANGELOG.md, and the repository files the
    pages link to."""
    _origins.clear()
    for file in files.documentation_pages():
        _origins[file.src_uri] = f"docs/{file.src_uri}"
    for repo_path, site_path in ROOT_PAGES.items():
        files.append(File.generated(config, site_path, abs_src_path=str(ROOT / repo_path)))
        _origins[site_path] = repo_path
    pending = list(_origins.items())
    while pending:
        site_path, origin = pending.pop()
        markdown = (ROOT / origin).read_text(encoding="utf-8")
        for _, repo_path in _targets(markdown, origin):
            served = _site_path(repo_path)
            if (
                not served.startswith(f"{REPO}/")
                or served in _origins
                or files.get_file_from_path(served) is not None
                or not (ROOT / repo_path).is_file()
            ):
                continue
            files.append(File.generated(config, served, abs_src_path=str(ROOT / repo_path)))
            if served.endswith(".md"):
                _origins[served] = repo_path
                pending.append((served, repo_path))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    """Point the page's links at where their targets are served."""
    origin = _origins.get(page.file.src_uri)
    if origin is None:
        return markdown
    here = posixpath.dirname(page.file.src_uri) or "."
    pieces: list[str] = []
    last = 0
    for match, repo_path in _targets(markdown, origin):
        target = posixpath.relpath(_site_path(repo_path), here)
        pieces += [markdown[last : match.start()], f"]({target}{match['rest']})"]
        last = match.end()
    return "".join([*pieces, markdown[last:]])
