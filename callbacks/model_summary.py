"""Print a table of the module's layers and parameter counts when fitting starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from torch import nn
from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
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


def _table(rows: list[SummaryRow]) -> Table:
    table = Table(header_style="bold")
    for column in ("", "Name", "Type", "Params", "Trainable", "Mode"):
        table.add_column(column, justify="right" if column in ("", "Params", "Trainable") else "left")
    for i, row in enumerate(rows):
        table.add_row(str(i), row.name, row.type, _human(row.params), _human(row.trainable), row.mode)
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
        console = Console()
        rows = summarize(module, self._max_depth)
        if rows:
            console.print(_table(rows))
        totals = summarize_totals(module)
        summary = Table.grid(padding=(0, 2))
        summary.add_column(justify="right")
        summary.add_column()
        summary.add_row(_human(totals.trainable), "Trainable params")
        summary.add_row(_human(totals.non_trainable), "Non-trainable params")
        summary.add_row(_human(totals.total), "Total params")
        summary.add_row(f"{totals.size_mb:,.3f}", "Total estimated params size (MB)")
        console.print(summary)
