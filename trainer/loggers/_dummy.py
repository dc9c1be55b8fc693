"""The logger ``fast_dev_run`` puts in place of the configured ones (Lightning's ``DummyLogger``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from typing_extensions import override

from ember.trainer.loggers.base import Logger

__all__ = ["DummyLogger"]


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


class _DummyExperiment:
    """Answers every call, attribute and index with nothing: ``logger.experiment.add_image(...)``."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing

    def __getitem__(self, index: Any) -> _DummyExperiment:
        return self


class DummyLogger(Logger):
    """Writes nothing, so that a short test run (``fast_dev_run``) leaves no files while the module's
    and the callbacks' logging code (``self.logger.experiment...``, ``LearningRateMonitor``) still runs."""

    def __init__(self) -> None:
        self.experiment = _DummyExperiment()

    @property
    @override
    def name(self) -> str:
        return ""

    @property
    @override
    def version(self) -> str:
        return ""

    @override
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        return None

    @override
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    @override
    def log_text(self, texts: dict[str, str], step: int) -> None:
        return None

    def __getitem__(self, index: int) -> DummyLogger:  # (self.logger[0].experiment, as Lightning's)
        return self
