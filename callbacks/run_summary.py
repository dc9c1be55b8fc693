"""Print a table of the logged metrics and where the checkpoints and logs are, when fitting ends."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["RunSummary"]


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class RunSummary(Callback):
    """At the end of ``fit``, on global rank 0: one row per logged metric (last value, lowest and
    highest with their steps), the best and last checkpoints of every ``ModelCheckpoint``, and the
    loggers' directories.

    The values come from the rows the loggers received (``trainer.metric_history``), so the table
    costs no device work. The Trainer adds it when ``enable_progress_bar=True``.

    Example::

        Trainer(callbacks=[RunSummary(console=Console(width=120))])
    """

    def __init__(self, console: Console | None = None) -> None:
        self._console = console

    def table(self, trainer: Trainer) -> Table:
        """The metrics table (also usable on its own, e.g. in a notebook)."""
        from rich.table import Table  # here: rich's modules are imported only when something is drawn

        table = Table(title="Run summary", title_justify="left")
        for column in ("metric", "last", "min", "max"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name, seen in sorted(trainer.metric_history.metrics.items()):
            table.add_row(
                name,
                f"{_number(seen.last)} (step {seen.last_step})",
                f"{_number(seen.min)} (step {seen.min_step})",
                f"{_number(seen.max)} (step {seen.max_step})",
            )
        return table

    def places(self, trainer: Trainer) -> list[tuple[str, str]]:
        """(what, where) for each checkpoint callback's best and last checkpoint and each logger."""
        from ember.callbacks.model_checkpoint import ModelCheckpoint

        found = []
        for callback in trainer.callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.best_model_path:
                score = None if callback.best_model_score is None else float(callback.best_model_score)
                monitored = (
                    f" ({callback.monitor}={_number(score)}, mode={callback.mode})"
                    if callback.monitor is not None and score is not None
                    else ""
                )
                found.append((f"best checkpoint{monitored}", callback.best_model_path))
            if callback.last_model_path:
                found.append(("last checkpoint", callback.last_model_path))
        for logger in trainer.loggers:
            if logger.log_dir is not None:
                found.append((f"{type(logger).__name__} logs", str(logger.log_dir)))
        return found

    @override
    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        console = self._console or Console()
        if trainer.metric_history.metrics:
            console.print(self.table(trainer))
        for what, where in self.places(trainer):
            console.print(f"{what}: {where}", highlight=False, soft_wrap=True)


def print_results(stage: str, results: list[dict[str, float]]) -> None:
    """``validate(verbose=True)`` and ``test``'s table: each metric, one column per dataloader."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{stage} results", title_justify="left")
    table.add_column("metric", justify="left")
    for index in range(len(results)):
        table.add_column(f"dataloader {index}", justify="right")
    names = sorted({name.split("/dataloader_idx_")[0] for result in results for name in result})
    for name in names:
        cells = []
        for index, result in enumerate(results):
            value = result.get(name, result.get(f"{name}/dataloader_idx_{index}"))
            cells.append("" if value is None else _number(value))
        table.add_row(name, *cells)
    Console().print(table)
