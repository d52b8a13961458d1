"""mkdocs hooks: pages that are other files of the repository, included at build time with their links rewritten.

A page whose Markdown is a single line ``<!-- include: PATH -->`` (a path from the repository root) is that file:
the QUICKSTART, the learning guide, each model's card (``textdiffusion/models/NAME/README.md``) — one home for
their text and numbers, never a copy. Their relative links were written for where they live; ``rewrite_links``
points them at the page of the site that shows the same file, at a file under ``docs/``, or, for anything else
of the repository (a recipe, a benchmark script, a results folder), turns the link into the path as code, since
the site does not carry those files.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"^<!-- include: (\S+) -->\s*$")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
# repository files that are pages of the site (the rest of docs/ is itself)
PAGES = {"README.md": "index.md", "QUICKSTART.md": "getting-started.md", "LEARNING_GUIDE.md": "learning-guide.md"}


def site_page(repo_path: str) -> str | None:
    """The docs-relative page that shows ``repo_path``, or None."""
    if repo_path in PAGES:
        return PAGES[repo_path]
    card = re.fullmatch(r"textdiffusion/models/([\w.-]+)/README\.md", repo_path)
    if card:
        return f"models/{card.group(1)}.md"
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    return None


def rewrite_links(markdown: str, source: str, page: str) -> str:
    """``markdown`` from the repository file ``source`` as the docs page ``page`` (both paths from their roots)."""
    here = posixpath.dirname(source)

    def fix(match: re.Match) -> str:
        bang, text, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)  # a URL, an anchor on the page, or a site-absolute path
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(here, path))
        shown = site_page(repo_path)
        if shown is not None:
            new = posixpath.relpath(shown, posixpath.dirname(page) or ".")
            return f"{bang}[{text}]({new}{'#' + anchor if anchor else ''})"
        if bang:  # a picture the site does not carry: its caption and where it is
            return f"*{text}* (`{repo_path}`)"
        label = text.strip("`")
        return f"`{repo_path}`" if label == repo_path or label == path else f"{text} (`{repo_path}`)"

    return LINK.sub(fix, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    match = INCLUDE.match(markdown.strip())
    if not match:
        return markdown
    source = match.group(1)
    text = (ROOT / source).read_text(encoding="utf-8")
    return rewrite_links(text, source, page.file.src_uri)
