"""Print a table of the module's layers and parameter counts when fitting starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from typing_extensions import override

from ember.callbacks.base import Callback
from ember.strategies.environment import may_be_terminal

if TYPE_CHECKING:
    from rich.table import Table

    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ModelSummary", "SummaryRow", "SummaryTotals", "summarize", "summarize_totals"]


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """One submodule: its dotted name, class, parameter counts and train/eval mode."""

    name: str
    type: str
    params: int
    trainable: int
    mode: str


@dataclass(frozen=True, slots=True)
class SummaryTotals:
    trainable: int
    non_trainable: int
    total: int
    size_mb: float


def _numel(parameter: nn.Parameter) -> int:
    # A lazy module's parameters have no shape until the first forward pass.
    return 0 if isinstance(parameter, nn.parameter.UninitializedParameter) else parameter.numel()


def summarize(module: nn.Module, max_depth: int = 1) -> list[SummaryRow]:
    """Rows for the submodules of ``module`` nested at most ``max_depth`` deep (-1: all).

    Depth 1 is the direct children. A parameter shared by two submodules counts in both rows,
    but once in :func:`summarize_totals`.
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
        raise ValueError(f"max_depth={max_depth!r} must be an int >= -1 (-1 shows every level)")
    rows = []
    for name, submodule in module.named_modules():
        depth = name.count(".") + 1
        if not name or (max_depth != -1 and depth > max_depth):
            continue
        params = list(submodule.parameters())
        rows.append(
            SummaryRow(
                name=name,
                type=type(submodule).__name__,
                params=sum(_numel(p) for p in params),
                trainable=sum(_numel(p) for p in params if p.requires_grad),
                mode="train" if submodule.training else "eval",
            )
        )
    return rows


def summarize_totals(module: nn.Module) -> SummaryTotals:
    """Parameter counts of the whole module, and its parameters' size in MB at their own dtypes."""
    params = list(module.parameters())  # shared parameters appear once
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    total = sum(_numel(p) for p in params)
    size = sum(_numel(p) * p.element_size() for p in params)
    return SummaryTotals(trainable, total - trainable, total, size / 1e6)


def _human(count: int) -> str:
    """``1234567`` -> ``"1.2 M"``; small counts stay exact."""
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f} {suffix}"
    return str(count)


_HEADER = ("", "Name", "Type", "Params", "Trainable", "Mode")
_RIGHT = ("", "Params", "Trainable")  # columns aligned right


def _cells(rows: list[SummaryRow]) -> list[tuple[str, ...]]:
    return [
        (str(i), r.name, r.type, _human(r.params), _human(r.trainable), r.mode) for i, r in enumerate(rows)
    ]


def _totals(totals: SummaryTotals) -> list[tuple[str, str]]:
    return [
        (_human(totals.trainable), "Trainable params"),
        (_human(totals.non_trainable), "Non-trainable params"),
        (_human(totals.total), "Total params"),
        (f"{totals.size_mb:,.3f}", "Total estimated params size (MB)"),
    ]


def _plain(rows: list[SummaryRow], totals: SummaryTotals) -> str:
    """The summary as plain text, for a log file: no rich import, no box drawing."""
    lines = []
    if rows:
        cells = [_HEADER, *_cells(rows)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADER))]
        for row in cells:
            parts = [
                c.rjust(w) if h in _RIGHT else c.ljust(w)
                for c, w, h in zip(row, widths, _HEADER, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
        lines.append("")
    width = max(len(number) for number, _ in _totals(totals))
    lines += [f"{number.rjust(width)}  {what}" for number, what in _totals(totals)]
    return "\n".join(lines)


def _table(rows: list[SummaryRow]) -> Table:
    from rich.table import Table

    table = Table(header_style="bold")
    for column in _HEADER:
        table.add_column(column, justify="right" if column in _RIGHT else "left")
    for cells in _cells(rows):
        table.add_row(*cells)
    return table


class ModelSummary(Callback):
    """On global rank 0, print the module's submodules up to ``max_depth`` and the parameter totals.

    ``max_depth=0`` prints only the totals; ``-1`` prints every level.

    Example::

        trainer = Trainer(callbacks=[ModelSummary(max_depth=2)])
        trainer.fit(module, loader)  # a table of layers, then "Total params  1.2 M" etc.
    """

    def __init__(self, max_depth: int = 1) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(
                f"ModelSummary(max_depth={max_depth!r}) must be an int >= -1 (-1 shows every level)"
            )
        self._max_depth = max_depth

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = summarize(module, self._max_depth)
        totals = summarize_totals(module)
        if not may_be_terminal():  # a log file: plain text, and rich's modules stay unimported
            print(_plain(rows, totals), flush=True)
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        if rows:
            console.print(_table(rows))
        summary = Table.grid(padding=(0, 2))
        summary.add_column(justify="right")
        summary.add_column()
        for number, what in _totals(totals):
            summary.add_row(number, what)
        console.print(summary)
