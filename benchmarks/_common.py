"""Shared by the benchmark scripts: launching ranks, counting bytes, describing the machine, and
writing a script's section of ``RESULTS.md``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def launch(script: str, argv: list[str], nproc: int = 2) -> list[dict[str, Any]]:
    """Run ``script --worker ... --out FILE`` on ``nproc`` processes with ``ember launch``; rank 0
    writes every rank's measurements to FILE as a JSON list."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "ember",
            "launch",
            "--nproc-per-node",
            str(nproc),
            script,
            *argv,
            "--out",
            str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def machine() -> str:
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, gloo, 1 thread per rank."
    )


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the ``name`` section of ``path`` (between its markers), keeping everything else."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# ember benchmark results\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def run_main(
    parser: argparse.ArgumentParser,
    name: str,
    workers: Sequence[str],
    worker: Callable[[argparse.Namespace], None],
    report: Callable[[argparse.Namespace], str],
) -> None:
    """A benchmark script's ``main``: as ``--worker S`` one rank measures strategy S; otherwise the
    script launches the ranks, prints its report and writes it as section ``name`` of the results."""
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to update")
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    section = report(args)
    write_section(args.results, name, section)
    print(section)


RATIOS = Path(__file__).resolve().parent / "results"


def record_ratios(name: str, rows: Sequence[dict[str, Any]], directory: Path = RATIOS) -> Path:
    """Write script ``name``'s ratios to ``results/<name>.json`` for the runner's chart.

    Each row: ``{"case": str, "ratio": float, "low": float, "high": float, "budget": float | None}``
    (the median ratio of a contender to its baseline, the spread over repetitions, and the budget
    the ratio must stay under, if any).
    """
    for row in rows:
        missing = {"case", "ratio", "low", "high", "budget"} - row.keys()
        if missing:
            raise ValueError(f"ratio row {row!r} lacks {sorted(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(list(rows), indent=1) + "\n")
    return path
