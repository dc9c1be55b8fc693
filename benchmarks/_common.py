"""Shared by the benchmark scripts: launching ranks and fresh interpreters, alternating contenders,
ratios and their tables, describing the machine, and writing a script's section of ``RESULTS.md``.

Every script's ``main`` is :func:`run_main`, so every script takes the options the runner
(``run.py``) passes: ``--results FILE``, ``--ratios DIR``, ``--quick`` and ``--device cpu|cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RATIOS = Path(__file__).resolve().parent / "results"
# Where ``--quick`` writes unless told otherwise: its small sizes say little, so they never replace
# the committed results.
QUICK = Path(__file__).resolve().parent.parent / "build" / "bench-quick"
T = TypeVar("T")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


# -- child processes -------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured process: one thread per process, and Python's bytecode cache
    on, as in an installed package (pip compiles ``.pyc`` files at install). Without it every
    ``import ember`` would compile ember's sources while torch's installed modules load compiled."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


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
        subprocess.run(cmd, check=True, env=child_env(), stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def forward(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """``--name value`` for each of ``names`` (attribute names of ``args``), to pass to a worker."""
    argv = []
    for name in names:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def pick(names: str, valid: Sequence[str], baseline: str) -> list[str]:
    """The contenders of a comma-separated ``--contenders`` option, baseline first (always)."""
    picked = [baseline, *(n for n in names.split(",") if n and n != baseline)]
    unknown = sorted(set(picked) - set(valid))
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}. Valid choices: {', '.join(valid)}")
    return picked


# -- alternating contenders and their ratios -------------------------------------------------------
def alternate(
    contenders: Sequence[str], reps: int, measure: Callable[[str], T], warm: bool = True, jobs: int = 1
) -> dict[str, list[T]]:
    """``measure(c)`` for every contender ``reps`` times, alternating: every round runs each contender
    once, so that drifts of a shared machine hit every contender alike, and each round starts one
    contender later (A B C, B C A, C A B ...), so that none always follows the same neighbour. With
    ``warm``, one unrecorded round comes first: it fills the page cache and the bytecode cache,
    which the first contender alone would otherwise pay. ``jobs > 1`` runs that many measurements
    of a round at once (for measures that start processes and read their CPU time, which another
    process on another core barely changes)."""
    rounds = [list(contenders)] if warm else []
    for round_ in range(reps):
        shift = round_ % len(contenders)
        rounds.append([*contenders[shift:], *contenders[:shift]])
    results: dict[str, list[T]] = {c: [] for c in contenders}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for number, order in enumerate(rounds):
            values = list(pool.map(measure, order)) if jobs > 1 else [measure(c) for c in order]
            if number > 0 or not warm:
                for contender, value in zip(order, values, strict=True):
                    results[contender].append(value)
    return results


def ratio_row(
    case: str, values: Sequence[float], baseline: Sequence[float], budget: float | None
) -> dict[str, Any]:
    """A :func:`record_ratios` row: the ratios of ``values`` to ``baseline``, paired by repetition
    (both measured in the same round), as their median, spread and the median's interval
    (:func:`median_interval`); ``value`` is the median of ``values``."""
    ratios = [v / b for v, b in zip(values, baseline, strict=True)]
    return {**median_row(case, ratios, budget), "value": statistics.median(values)}


def median_row(case: str, ratios: Sequence[float], budget: float | None) -> dict[str, Any]:
    """A :func:`record_ratios` row of repeated ratios: median, spread and the median's interval."""
    return {"case": case, "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "interval": median_interval(ratios), "budget": budget}  # fmt: skip


CONFIDENCE = 0.9  # of the median's interval
MIN_INTERVAL_REPS = 5  # fewer repetitions: no interval (it would say no more than the spread)


def median_interval(ratios: Sequence[float], resamples: int = 2000) -> list[float] | None:
    """The median's :data:`CONFIDENCE` interval: a percentile bootstrap (``ratios`` resampled with
    replacement ``resamples`` times, the median of each), with a fixed seed so that the same ratios
    give the same interval. It says how far the median of another run as long could land: a budget
    inside it is not decided by this run. None below :data:`MIN_INTERVAL_REPS` repetitions."""
    if len(ratios) < MIN_INTERVAL_REPS:
        return None
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = round(resamples * (1 - CONFIDENCE) / 2)
    return [medians[tail], medians[resamples - 1 - tail]]


def interval_text(row: dict[str, Any]) -> str:
    """A row's interval for a table: ``low-high``, then ``(undecided)`` when its budget lies inside."""
    interval, budget = row.get("interval"), row["budget"]
    if interval is None:
        return "-"
    undecided = budget is not None and interval[0] <= budget < interval[1]
    return f"{interval[0]:.3f}-{interval[1]:.3f}" + (" (undecided)" if undecided else "")


def seconds(value: float) -> str:
    """A duration for a table: milliseconds below 10 s."""
    return (
        f"{value * 1e3:.1f} ms"
        if value < 0.1
        else f"{value * 1e3:.0f} ms"
        if value < 10
        else f"{value:.1f} s"
    )


def verdict(row: dict[str, Any]) -> str:
    if row["budget"] is None:
        return "-"
    return "pass" if row["ratio"] <= row["budget"] else "**OVER**"


def ratio_table(
    rows: Sequence[dict[str, Any]], baseline: tuple[str, float], value: str, show: Callable[[float], str]
) -> list[str]:
    """Markdown lines: the baseline (its median, ``show`` formats it) and one line per ratio row."""
    lines = [
        f"| case | median {value} | ratio to {baseline[0]} (median) | spread (min-max) | "
        f"{CONFIDENCE:.0%} interval of the median | budget | verdict |",
        "|---|---|---|---|---|---|---|",
        f"| {baseline[0]} (baseline) | {show(baseline[1])} | 1 | - | - | - | - |",
    ]
    for row in rows:
        budget = "-" if row["budget"] is None else f"<= {row['budget']:g}"
        lines.append(
            f"| {row['case']} | {show(row['value'])} | {row['ratio']:.3f} | {row['low']:.3f}-{row['high']:.3f} "
            f"| {interval_text(row)} | {budget} | {verdict(row)} |"
        )
    return lines


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


def callgrind_unavailable() -> str | None:
    """Why instructions cannot be counted here (``instructions.py``), or None when they can."""
    for tool in ("valgrind", "cc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not any(Path(p, "valgrind", "callgrind.h").exists() for p in ("/usr/include", "/usr/local/include")):
        return "valgrind's headers (valgrind/callgrind.h) are not installed"
    return None


# -- the machine -----------------------------------------------------------------------------------
def host(device: str = "cpu") -> str:
    """The machine in one line: CPU model and count, memory, OS, Python, torch (and the GPU on CUDA)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (OSError, ValueError):
        memory = ""
    text = (
        f"Machine: {model} ({platform.machine()}), {os.cpu_count()} CPUs{memory}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if device == "cuda":
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return text + "."


def machine() -> str:
    return host()[:-1] + ", gloo, 1 thread per rank."


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False). "
            "The GPU section of the benchmarks runs on a machine with an NVIDIA GPU and a CUDA build of torch."
        )


# -- RESULTS.md and the scripts' main --------------------------------------------------------------
def write_section(path: Path, name: str, section: str, first: bool = False) -> None:
    """Replace the ``name`` section of ``path`` (between its markers), keeping everything else. A new
    section goes at the end, or with ``first`` before the first section (after the introduction)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# ember benchmark results\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    elif first and "<!-- " in text:
        at = text.index("<!-- ")
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def quick_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """``--results``/``--ratios`` for a ``--quick`` run: under :data:`QUICK` unless given."""
    out = {}
    if args.results == RESULTS:
        out["results"] = QUICK / "RESULTS.md"
    if args.ratios == RATIOS:
        out["ratios"] = QUICK / "results"
    for path in out.values():
        (path.parent if path.suffix else path).mkdir(parents=True, exist_ok=True)
    return out


def run_main(
    parser: argparse.ArgumentParser,
    name: str,
    workers: Sequence[str],
    worker: Callable[[argparse.Namespace], None],
    report: Callable[[argparse.Namespace], str],
    *,
    quick: dict[str, Any] | None = None,
    devices: Sequence[str] = ("cpu",),
) -> None:
    """A benchmark script's ``main``: as ``--worker W`` one process (or rank) measures ``W``;
    otherwise the script runs its workers, prints its report and writes it as section ``name`` of
    the results (``name_cuda`` with ``--device cuda``). ``report`` reads ``args.name`` to record
    its ratios (:func:`record_ratios` into ``args.ratios``). ``--quick`` applies the ``quick``
    defaults (options given explicitly still win). ``devices``: where the script can run.
    """
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to update")
    parser.add_argument("--ratios", type=Path, default=RATIOS, help="where to write the ratios (JSON)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke test)")
    parser.add_argument("--device", choices=devices, default="cpu", help="where the measured work runs")
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**(quick or {}), **quick_outputs(args))
        args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda":
        require_cuda()
    args.name = f"{name}_cuda" if args.device == "cuda" else name
    section = report(args)
    write_section(args.results, args.name, section)
    print(section)
