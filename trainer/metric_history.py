"""The extremes of every row the loggers received, for the end-of-fit summary (``RunSummary``)."""

from __future__ import annotations

import dataclasses

__all__ = ["MetricExtremes", "MetricHistory"]


@dataclasses.dataclass(slots=True)
class MetricExtremes:
    """The last, lowest and highest value a metric was logged with, and the steps of each."""

    last: float
    last_step: int
    min: float
    min_step: int
    max: float
    max_step: int


class MetricHistory:
    """Per metric, the extremes of every row the loggers received (Python floats, no device work)."""

    def __init__(self) -> None:
        self.metrics: dict[str, MetricExtremes] = {}

    def update(self, row: dict[str, float], step: int) -> None:
        for name, value in row.items():
            seen = self.metrics.get(name)
            if seen is None:
                self.metrics[name] = MetricExtremes(value, step, value, step, value, step)
                continue
            seen.last, seen.last_step = value, step
            if value < seen.min:
                seen.min, seen.min_step = value, step
            if value > seen.max:
                seen.max, seen.max_step = value, step
