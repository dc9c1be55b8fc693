"""``RichProgressBarTheme``: the styles of :class:`~ember.callbacks.RichProgressBar`'s columns (Lightning's)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from typing_extensions import override

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn, Task
    from rich.style import Style
    from rich.text import Text

__all__ = ["RichProgressBarTheme"]


@dataclass
class RichProgressBarTheme:
    """The styles of the rich bars, as Lightning's (its defaults too): each a rich style string
    (``"bold red"``, ``"#6206E0"``) or a ``rich.style.Style``; ``""`` for none. Only the rich
    bars use it; the plain lines of logs and CI keep ember's format.

    Example::

        RichProgressBar(theme=RichProgressBarTheme(progress_bar="green", metrics_format=".4f"))
    """

    description: str | Style = ""  # "Epoch N", "Validation", ...
    progress_bar: str | Style = "#6206E0"
    progress_bar_finished: str | Style = "#6206E0"
    progress_bar_pulse: str | Style = "#6206E0"  # a bar of unknown total
    batch_progress: str | Style = ""  # "10/50"
    time: str | Style = "dim"  # elapsed and remaining
    processing_speed: str | Style = "dim underline"
    metrics: str | Style = "italic"
    metrics_text_delimiter: str = " "
    metrics_format: str = ".3f"  # a format spec for each number: "loss: 0.431"

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``name: value`` for each metric (numbers in ``metrics_format``), joined by the delimiter."""
        return self.metrics_text_delimiter.join(
            f"{name}: {_formatted(value, self.metrics_format)}" for name, value in metrics.items()
        )

    def columns(self, speed: ProgressColumn) -> list[ProgressColumn]:
        """The bar's columns in this theme (rich is imported here: only when drawing)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return [
            TextColumn("[progress.description]{task.description}", style=self.description),
            BarColumn(
                complete_style=self.progress_bar,
                finished_style=self.progress_bar_finished,
                pulse_style=self.progress_bar_pulse,
            ),
            _restyled(MofNCompleteColumn(), self.batch_progress),
            _restyled(speed, self.processing_speed),
            _restyled(TimeElapsedColumn(), self.time),
            _restyled(TimeRemainingColumn(), self.time),
            TextColumn("{task.fields[metrics]}", markup=False, style=self.metrics),
        ]


def _formatted(value: Any, spec: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return f"{value:{spec}}"
    except (TypeError, ValueError):
        return str(value)


def _restyled(inner: ProgressColumn, style: str | Style) -> ProgressColumn:
    """``inner``'s text in ``style`` instead of rich's default style for it."""
    from rich.progress import ProgressColumn

    class Restyled(ProgressColumn):
        @override
        def render(self, task: Task) -> Text:
            text = inner.render(task)
            text.style = style  # type: ignore[union-attr]
            return text  # type: ignore[return-value]

    return Restyled()


def _is_console(value: Any) -> bool:
    from rich.console import Console  # a Console was made: rich is imported already

    return isinstance(value, Console)


def _console_of(console_kwargs: Any) -> Console:
    """``Console(**console_kwargs)``, or an error naming the argument."""
    from rich.console import Console

    if not isinstance(console_kwargs, dict):
        raise TypeError(
            f"RichProgressBar(console_kwargs={console_kwargs!r}) must be a dict of Console arguments"
        )
    try:
        return Console(**console_kwargs)
    except TypeError as error:
        valid = ", ".join(inspect.signature(Console).parameters)
        raise TypeError(
            f"RichProgressBar(console_kwargs={console_kwargs!r}): {error}; valid: {valid}"
        ) from None
