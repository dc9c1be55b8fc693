"""Every ```python block of README.md and docs/**/*.md runs, page by page, as written.

One test per page: its ```python blocks, joined in order (after the page's hidden
``<!-- docs-test-setup ... -->`` code, if any), run as ``python page_script.py`` in a fresh process
in an empty directory. ```python xla blocks run in the XLA suite (tests/xla/test_xla_docs.py); every
other info string is never run. docs/contributing-docs.md is the writers' version of these rules.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dist_helpers import REPO, base_env
from docs_blocks import SETUP_OPEN, extract_blocks, fence_problems, page_script, pages, run_page, run_script

PAGES = pages()

# A page's script starts at most 2 processes (devices=2 re-runs it for rank 1) on a small model.
PAGE_TIMEOUT = 120.0


def docs_env() -> dict[str, str]:
    """No rank variables (each page is a plain ``python script.py``); loggers stay offline."""
    return base_env(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        DS_ACCELERATOR="cpu",  # DeepSpeed on CPU (bf16 only there)
        MPLBACKEND="Agg",
        # DeepSpeed compiles a C++ op once; keep it with the rest of the suite's builds (see the Makefile).
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/ember/torch_extensions")
        ),
    )


def _page_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_python_blocks_run(page: Path) -> None:
    """The page's fences are closed and honestly labelled, and its ```python blocks run (if any)."""
    problems = fence_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{_page_id(page)}:\n" + "\n".join(problems)
    try:
        run_page(page, "python", env=docs_env(), timeout=PAGE_TIMEOUT)
    except AssertionError as failure:
        message = str(failure)
    else:
        return
    pytest.fail(message, pytrace=False)  # the message holds the page's own traceback


# --- the extractor itself -------------------------------------------------------------------------

PAGE = """\
# A page

Some prose.

```python
import math

radius = 2.0
```

```bash
python train.py --this-is-not-python
```

<!-- docs-test-setup
SCALE = 10
-->

Indented, inside a list item:

1. Step one:

   ```python
   area = math.pi * radius**2 * SCALE
   ```

```python xla
import torch_xla
```

<!-- docs-test-setup xla
DEVICE = "xla"
-->

```text
not run
```

```python
print(f"area={area:.1f}")
```
"""


def test_extract_blocks_finds_every_fence_and_the_setup() -> None:
    blocks = extract_blocks(PAGE)
    assert [(b.info, b.line) for b in blocks] == [
        ("python", 6),  # the line of a block's first line of code
        ("bash", 12),
        ("setup", 16),
        ("python", 24),
        ("python xla", 28),
        ("setup xla", 32),
        ("text", 36),
        ("python", 40),
    ]
    assert blocks[3].code == "area = math.pi * radius**2 * SCALE"  # the list indentation removed


def test_page_script_is_setup_then_python_blocks_in_order() -> None:
    script = page_script(PAGE, "page.md")
    assert script is not None
    assert script.source == (
        "# page.md:16 (docs-test-setup)\n"
        "SCALE = 10\n"
        "# page.md:6 (```python)\n"
        "import math\n"
        "\n"
        "radius = 2.0\n"
        "# page.md:24 (```python)\n"
        "area = math.pi * radius**2 * SCALE\n"
        "# page.md:40 (```python)\n"
        'print(f"area={area:.1f}")\n'
    )
    assert script.line_map == [None, 16, None, 6, 7, 8, None, 24, None, 40]
    xla = page_script(PAGE, "page.md", info="python xla")
    assert xla is not None
    assert xla.source == (
        '# page.md:32 (docs-test-setup xla)\nDEVICE = "xla"\n# page.md:28 (```python xla)\nimport torch_xla\n'
    )
    assert page_script("```bash\nls\n```\n", "page.md") is None
    assert SETUP_OPEN == "<!-- docs-test-setup"


def test_setup_comments_are_checked() -> None:
    with pytest.raises(ValueError, match="line 1: <!-- docs-test-setup is never closed"):
        extract_blocks("<!-- docs-test-setup\nimport torch\n")
    with pytest.raises(ValueError, match="line 2: write <!-- docs-test-setup"):
        extract_blocks("text\n<!-- docs-test-setup gpu\nimport torch\n-->\n")


def test_fence_problems_flag_python_that_would_never_run() -> None:
    assert fence_problems(PAGE) == []
    page = "```py\nx = 1\n```\n\n```python3\nx = 1\n```\n\n```pycon\n>>> 1\n```\n"
    assert [p.split(":")[0] for p in fence_problems(page)] == ["line 1", "line 5"]
    with pytest.raises(ValueError, match="line 3: the fenced block opened here is never closed"):
        extract_blocks("text\n\n```python\nx = 1\n")


def test_a_page_script_runs_its_blocks_together(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    done = run_page(page, env=base_env())
    assert done is not None
    assert done.stdout.strip() == f"area={3.141592653589793 * 4 * 10:.1f}"


def test_a_failing_block_is_named_by_its_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text(
        "# Broken\n"  # 1
        "\n"  # 2
        "```python\n"  # 3
        "x = 1\n"  # 4
        "```\n"  # 5
        "\n"  # 6
        "```python\n"  # 7
        "y = x + 1\n"  # 8
        "\n"  # 9
        "def f():\n"  # 10
        "    return undefined_name\n"  # 11
        "\n"  # 12
        "f()\n"  # 13
        "```\n"  # 14
    )
    with pytest.raises(AssertionError) as failure:
        run_page(page, env=base_env())
    message = str(failure.value)
    assert message.startswith("broken.md: the block at line 8 failed (exit code 1)")
    assert 'File "broken.md", line 13, in <module>' in message
    assert 'File "broken.md", line 11, in f' in message
    assert "NameError: name 'undefined_name' is not defined" in message
    assert "page_script.py" not in message.split("\n", 1)[1]  # every script line number was mapped


def test_a_page_that_hangs_is_stopped(tmp_path: Path) -> None:
    script = page_script("```python\nimport time\n\ntime.sleep(60)\n```\n", "slow.md")
    assert script is not None
    with pytest.raises(AssertionError, match=r"slow.md: the page's script did not finish in 1 s") as failure:
        run_script(script, "slow.md", env=base_env(), timeout=1.0)
    assert "(stuck in the block at line 2)" in str(failure.value)
    assert 'File "slow.md", line 4 in <module>' in str(failure.value)  # faulthandler's stack, mapped
