"""Run the Python code blocks of the Markdown docs, page by page (tests/docs and tests/xla use this).

The convention (docs/contributing-docs.md explains it to writers):

- Pages: ``README.md`` and every ``docs/**/*.md``.
- A fenced block whose info string is exactly ``python`` runs in the main suite; ``python xla`` runs
  only in the XLA suite (.venv-xla, ``PJRT_DEVICE=CPU``). Every other info string (``bash``, ``text``,
  ``console``, ``toml``, ``yaml``, ``json``, ``pycon``, none...) is never run.
- All the blocks of one kind on a page are joined, in order, into one script: a later block can use
  the names an earlier one defined. The script runs as ``python page_script.py`` in a fresh process,
  in an empty temporary directory.
- ``<!-- docs-test-setup ... -->`` anywhere on a page holds Python that runs before the page's
  ```python blocks (imports or tiny data a fragment needs, invisible to readers);
  ``<!-- docs-test-setup xla ... -->`` the same for its ```python xla blocks.

A failure names the page, the Markdown line of the block that failed and the traceback, with the
script's line numbers turned back into the page's (``File "docs/x.md", line 42``).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import warm_python
from dist_helpers import PYTHON, REPO, base_env

SETUP_OPEN = "<!-- docs-test-setup"
SETUP_CLOSE = "-->"
SCRIPT_NAME = "page_script.py"
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """A fenced block, or a hidden set-up comment (``info`` "setup" or "setup xla")."""

    info: str
    line: int  # the Markdown line (1-based) of the block's first code line
    code: str


@dataclass(frozen=True)
class PageScript:
    source: str
    # line_map[i] is the Markdown line of script line i + 1, or None for a "# page.md:N" header line
    line_map: list[int | None]
    block_lines: list[int | None]  # the Markdown line where the block holding script line i + 1 starts


def pages(root: Path = REPO) -> list[Path]:
    """README.md and every Markdown file under docs/, sorted."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def extract_blocks(text: str) -> list[Block]:
    """Every fenced block (any info string) and every set-up comment of a page, in page order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is not None and not (fence["fence"][0] == "`" and "`" in fence["info"]):
            indent, marker = len(fence["indent"]), fence["fence"]
            info = " ".join(fence["info"].split())
            start = i + 1
            end = start
            # A closing fence: the same character, at least as long, nothing after it.
            closing = re.compile(rf"^ *{re.escape(marker[0])}{{{len(marker)},}}\s*$")
            while end < len(lines) and not closing.match(lines[end]):
                end += 1
            if end == len(lines):
                raise ValueError(f"line {i + 1}: the fenced block opened here is never closed")
            body = [_strip_indent(code, indent) for code in lines[start:end]]
            blocks.append(Block(info=info, line=start + 1, code="\n".join(body)))
            i = end + 1
            continue
        if line.lstrip().startswith(SETUP_OPEN):
            # The opening line holds only the kind: nothing (for ```python) or xla (for ```python xla).
            kind, closed, _ = line.lstrip()[len(SETUP_OPEN) :].partition(SETUP_CLOSE)
            if kind.split() not in ([], ["xla"]) or closed:
                raise ValueError(f"line {i + 1}: write {SETUP_OPEN} (or {SETUP_OPEN} xla), then the code")
            chunk, end = [], i + 1
            while end < len(lines) and SETUP_CLOSE not in lines[end]:
                chunk.append(lines[end])
                end += 1
            if end == len(lines):
                raise ValueError(f"line {i + 1}: {SETUP_OPEN} is never closed by {SETUP_CLOSE}")
            last = lines[end][: lines[end].index(SETUP_CLOSE)]
            if last.strip():
                chunk.append(last)
            info = " ".join(["setup", *kind.split()])
            blocks.append(Block(info=info, line=i + 2, code=textwrap.dedent("\n".join(chunk))))
            i = end + 1
            continue
        i += 1
    return blocks


# Info strings that look like Python but would silently never run: a typo for ```python.
_PYTHON_LOOKALIKES = {"py", "py3", "python3", "python", "python-xla", "xla"}


def fence_problems(text: str) -> list[str]:
    """Info strings that are neither runnable nor honestly something else (```py, ```Python...)."""
    problems = []
    for block in extract_blocks(text):
        if block.info in ("python", "python xla", "setup", "setup xla"):
            continue
        words = block.info.lower().split()
        if words and words[0] in _PYTHON_LOOKALIKES:
            problems.append(
                f"line {block.line - 1}: ```{block.info} is never run; write ```python (runs in the main"
                " suite), ```python xla (runs in the XLA suite) or an honest ```text"
            )
    return problems


def _strip_indent(line: str, indent: int) -> str:
    """A fence indented by N spaces (inside a list item) has its content indented by up to N too."""
    spaces = len(line) - len(line.lstrip(" "))
    return line[min(spaces, indent) :]


def page_script(text: str, name: str, info: str = "python") -> PageScript | None:
    """The script for the blocks of ``info`` on a page, set-up first; None when it has none."""
    blocks = extract_blocks(text)
    code = [b for b in blocks if b.info == info]
    if not code:
        return None
    source: list[str] = []
    line_map: list[int | None] = []
    block_lines: list[int | None] = []
    setup = "setup" + info.removeprefix("python")  # "setup" for python, "setup xla" for python xla
    for block in [b for b in blocks if b.info == setup] + code:
        what = f"docs-test-{block.info}" if block.info == setup else f"```{block.info}"
        source.append(f"# {name}:{block.line} ({what})")
        line_map.append(None)
        block_lines.append(block.line)
        for offset, code_line in enumerate(block.code.split("\n")):
            source.append(code_line)
            line_map.append(block.line + offset)
            block_lines.append(block.line)
    return PageScript(source="\n".join(source) + "\n", line_map=line_map, block_lines=block_lines)


_TRACE_LINE = re.compile(rf'File "[^"]*{re.escape(SCRIPT_NAME)}", line (\d+)')


def map_traceback(output: str, script: PageScript, name: str) -> tuple[str, int | None]:
    """Rewrite the script's file and line numbers as the page's; also return the failing block's line.

    The failing block is the one holding the last script line in the output (the innermost frame of
    the page's own code).
    """
    failing: int | None = None

    def replace(match: re.Match[str]) -> str:
        nonlocal failing
        index = int(match.group(1)) - 1
        if not 0 <= index < len(script.line_map):
            return match.group(0)
        failing = script.block_lines[index]
        md_line = script.line_map[index]
        return f'File "{name}", line {md_line if md_line is not None else script.block_lines[index]}'

    return _TRACE_LINE.sub(replace, output), failing


def run_page(
    path: Path,
    info: str = "python",
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    python: str = PYTHON,
) -> subprocess.CompletedProcess[str] | None:
    """Run one page's ``info`` blocks as a script; raise AssertionError naming the failing block.

    Returns None when the page has no such block.
    """
    name = _display_name(path)
    script = page_script(path.read_text(encoding="utf-8"), name, info)
    if script is None:
        return None
    return run_script(script, name, env=env, timeout=timeout, python=python)


def run_script(
    script: PageScript,
    name: str,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    python: str = PYTHON,
) -> subprocess.CompletedProcess[str]:
    workdir = Path(tempfile.mkdtemp(prefix="ember-docs-"))
    (workdir / SCRIPT_NAME).write_text(script.source, encoding="utf-8")
    env = {**(env if env is not None else base_env()), "PYTHONFAULTHANDLER": "1"}
    with open(workdir / "stdout.txt", "w+b") as out, open(workdir / "stderr.txt", "w+b") as err:
        process = warm_python.start([python, SCRIPT_NAME], env=env, cwd=workdir, stdout=out, stderr=err)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            # SIGABRT makes faulthandler print where the script is stuck, then it dies.
            process.send_signal(signal.SIGABRT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            timed_out = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if timed_out:
        mapped, failing = map_traceback(stdout + "\n" + stderr, script, name)
        raise AssertionError(
            f"{name}: the page's script did not finish in {timeout:.0f} s (stuck in the block at"
            f" line {failing}); the page's script is in {workdir / SCRIPT_NAME}\n{mapped[-8000:]}"
        )
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if done.returncode == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        mapped, failing = map_traceback(done.stdout + "\n" + done.stderr, script, name)
        where = f"the block at line {failing}" if failing is not None else "a block (no traceback line)"
        raise AssertionError(
            f"{name}: {where} failed (exit code {done.returncode}); the page's script is in"
            f" {workdir / SCRIPT_NAME}\n{mapped[-8000:]}"
        )
    return done


def _display_name(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.name
