"""The ```python xla blocks of README.md and docs/**/*.md run on the XLA CPU device (``PJRT_DEVICE=CPU``).

The XLA half of tests/docs/test_code_blocks.py: per page, the ```python xla blocks joined in order
(after the page's ``<!-- docs-test-setup xla ... -->`` code) run as one script in a fresh process of
this venv (.venv-xla). The rules are in docs/contributing-docs.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import REPO, base_env
from docs_blocks import page_script, pages, run_page

XLA_PAGES = [p for p in pages() if page_script(p.read_text(encoding="utf-8"), p.name, "python xla")]


def test_the_xla_guide_has_xla_blocks() -> None:
    """The XLA guide's examples are here, so this suite cannot pass by finding no block at all."""
    assert REPO / "docs/how-to/train-on-xla.md" in XLA_PAGES


@pytest.mark.parametrize("page", XLA_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_page_python_xla_blocks_run(page: Path) -> None:
    env = base_env(PJRT_DEVICE="CPU", WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        run_page(page, "python xla", env=env, timeout=240.0)
    except AssertionError as failure:
        message = str(failure)
    else:
        return
    pytest.fail(message, pytrace=False)  # the message holds the page's own traceback
