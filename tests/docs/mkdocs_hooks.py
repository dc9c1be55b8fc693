"""mkdocs hooks (see mkdocs.yml): what the Markdown pages and docstrings need from the site build.

- ```python xla marks the blocks that only the XLA suite runs (tests/docs_blocks.py). Python-Markdown
  takes no second word after the language, so the site gets ```python.
- A link to a repository file outside docs/ (``[examples/digits.py](../../examples/digits.py)``)
  works on GitHub but has no page on the site: the site shows its text instead. A link to a file
  that does not exist is left alone, so ``mkdocs build --strict`` still reports it.
- The docstrings on the API pages have reST touches (``:class:`Trainer```, ``Example::``) but are
  rendered as Markdown: the roles and the second colon are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_XLA_FENCE = re.compile(r"^(?P<fence> *(?:`{3,}|~{3,}))python xla[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|meth|func|attr|mod|obj|data|exc):(?=<code>)")
_LITERAL_COLONS = re.compile(r"(?<=\S)::</p>")
# An inline code span (left alone) or a link, outside fenced blocks.
_CODE_OR_LINK = re.compile(
    r"(?P<code>(?P<ticks>`+).+?(?P=ticks))"
    r"|(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)"
)
_FENCE = re.compile(r"^ *(`{3,}|~{3,})")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    markdown = _XLA_FENCE.sub(r"\g<fence>python", markdown)
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = Path(page.file.abs_src_path).resolve().parent

    def unlink_outside_docs(match: re.Match[str]) -> str:
        target = match["target"]
        if match["code"] or "://" in target or target.startswith(("mailto:", "/")):
            return match.group(0)
        path = (page_dir / target).resolve()
        if path.is_relative_to(docs_dir) or not path.exists():
            return match.group(0)
        return match["text"]

    lines, fence = markdown.split("\n"), None
    for i, line in enumerate(lines):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening[1]
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            lines[i] = _CODE_OR_LINK.sub(unlink_outside_docs, line)
    return "\n".join(lines)


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    if not page.file.src_uri.startswith("reference/api/"):
        return html
    return _LITERAL_COLONS.sub(":</p>", _ROLE.sub("", html))
