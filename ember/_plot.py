"""``ember plot``: the metrics of one or more runs, read from their ``metrics.csv``, drawn into one PNG.

A run is a folder holding the ``metrics.csv`` that :class:`~ember.trainer.loggers.CSVLogger` writes
(``<save_dir>/<name>/version_N/``): a ``step`` column, an ``epoch`` column and one column per
metric, with empty cells where a row did not log that metric. One subplot per metric, x = step,
one line per run. A metric logged at most once per epoch (validation values, ``*_epoch``) is drawn
with markers, so a few points still show. matplotlib draws off-screen (Agg), never in a window.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PlotError", "plot_runs"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NOT_METRICS = ("step", "epoch")
_COLUMNS = 3  # subplots per row


class PlotError(ValueError):
    """Input that ``ember plot`` cannot draw; the message says what to give instead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Run:
    label: str
    csv: Path
    rows: int
    series: dict[str, tuple[list[float], list[float]]]  # metric -> (steps, values)
    per_epoch: frozenset[str]


def _natural(path: Path) -> list[object]:
    """Sort key putting version_2 before version_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _find_csvs(run_dirs: Sequence[str]) -> list[Path]:
    files: dict[Path, None] = {}  # ordered and without repeats
    for given in run_dirs:
        path = Path(given)
        if path.is_file() and path.suffix == ".csv":
            found = [path]
        elif not path.is_dir():
            raise PlotError(f"RUN_DIR {given!r} does not exist")
        elif (path / "metrics.csv").is_file():
            found = [path / "metrics.csv"]
        else:
            found = sorted(path.rglob("metrics.csv"), key=_natural)
        if not found:
            raise PlotError(
                f"RUN_DIR {given!r} holds no metrics.csv: give a run folder written by CSVLogger "
                "(<save_dir>/<name>/version_N) or a folder above such runs"
            )
        files.update(dict.fromkeys(f.resolve() for f in found))
    return list(files)


def _labels(files: Sequence[Path]) -> list[str]:
    """Each run's folder relative to the common parent of the runs' folders (version_0, a/version_1, ...)."""
    folders = [f.parent for f in files]
    base = os.path.commonpath([str(folder.parent) for folder in folders])
    return [os.path.relpath(folder, base) for folder in folders]


def _number(cell: str | None, csv_path: Path, line: int, column: str) -> float | None:
    if cell is None or cell.strip() == "":
        return None
    try:
        return float(cell)
    except ValueError:
        raise PlotError(f"{csv_path} line {line}: {column} {cell!r} is not a number") from None


def _read_run(label: str, csv_path: Path) -> _Run:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if "step" not in columns:
            raise PlotError(
                f"{csv_path} has no 'step' column (columns: {', '.join(columns) or 'none'}); "
                "ember plot reads the metrics.csv that CSVLogger writes"
            )
        metrics = [c for c in columns if c not in _NOT_METRICS]
        series: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in metrics}
        epochs: dict[str, list[float | None]] = {m: [] for m in metrics}
        rows = 0
        for line, row in enumerate(reader, start=2):
            rows += 1
            step = _number(row["step"], csv_path, line, "step")
            if step is None:
                raise PlotError(f"{csv_path} line {line}: the step cell is empty")
            epoch = _number(row.get("epoch"), csv_path, line, "epoch")
            for metric in metrics:
                value = _number(row[metric], csv_path, line, metric)
                if value is not None:
                    series[metric][0].append(step)
                    series[metric][1].append(value)
                    epochs[metric].append(epoch)
    # At most one value per epoch: an epoch-end metric (val_loss, train_loss_epoch), drawn with markers.
    per_epoch = frozenset(
        m for m in metrics
        if m.endswith("_epoch") or ("epoch" in columns and None not in epochs[m] and len(set(epochs[m])) == len(epochs[m]))
    )  # fmt: skip
    series = {m: points for m, points in series.items() if points[0]}  # a column with no value draws nothing
    return _Run(label=label, csv=csv_path, rows=rows, series=series, per_epoch=per_epoch)


def _check_out(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise PlotError(f"--out {out!r} must end in .png: ember plot writes a PNG image")
    if path.is_dir():
        raise PlotError(f"--out {out!r} is a directory; give the path of the PNG file to write")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(_PNG_MAGIC)) != _PNG_MAGIC:
                raise PlotError(
                    f"--out {out!r} exists and is not a PNG image; ember plot replaces only a PNG, "
                    "so this file is left as it is"
                )
    return path


def _select(runs: Sequence[_Run], wanted: str | None) -> list[str]:
    available = list(dict.fromkeys(m for run in runs for m in run.series))
    if not available:
        raise PlotError("no metric values to plot in " + ", ".join(str(run.csv) for run in runs))
    if wanted is None:
        return available
    chosen = list(dict.fromkeys(name.strip() for name in wanted.split(",") if name.strip()))
    if not chosen:
        raise PlotError(f"--metrics {wanted!r} names no metric; available: {', '.join(available)}")
    for name in chosen:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlotError(f"unknown metric {name!r} in --metrics{hint}; available: {', '.join(available)}")
    return chosen


def _draw(runs: Sequence[_Run], metrics: Sequence[str], out: Path) -> None:
    # The object API with the Agg canvas: no pyplot, so no GUI backend and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.5 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, metric in zip(axes, metrics, strict=False):
        for index, run in enumerate(runs):
            if metric not in run.series:
                continue
            steps, values = run.series[metric]
            markers = metric in run.per_epoch or len(steps) == 1
            # One colour per run in every subplot (C0, C1, ...: matplotlib's default cycle).
            ax.plot(steps, values, label=run.label, color=f"C{index % 10}", marker="o" if markers else None,
                    markersize=4)  # fmt: skip
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:  # written whole, then renamed: an earlier picture is never left half-replaced
        figure.savefig(tmp, format="png", dpi=figure.dpi)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        header = f.read(24)  # magic (8), IHDR length and type (8), width and height (4 + 4)
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


def plot_runs(
    run_dirs: Sequence[str], metrics: str | None, out: str, say: Callable[[str], None] = print
) -> None:
    """Draw the runs' metrics into the PNG ``out``; every input is checked before anything is drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("ember plot needs matplotlib: pip install 'ember[plot]'") from None
    path = _check_out(out)
    files = _find_csvs(run_dirs)
    runs = [_read_run(label, f) for label, f in zip(_labels(files), files, strict=True)]
    chosen = _select(runs, metrics)
    _draw(runs, chosen, path)
    for run in runs:
        say(f"run {run.label}: {run.rows} rows from {run.csv}")
    for metric in chosen:
        having = [run for run in runs if metric in run.series]
        kind = "per epoch" if all(metric in run.per_epoch for run in having) else "per step"
        say(
            f"  {metric}: {len(having)} run(s), {sum(len(r.series[metric][0]) for r in having)} points, {kind}"
        )
    width, height = _png_size(path)
    say(f"wrote {path} ({width} x {height} pixels, {len(chosen)} metric(s), {len(runs)} run(s))")
