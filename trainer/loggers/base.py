"""The logger interface: small, so CSV, W&B and TensorBoard loggers are each one file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Logger"]


class Logger(ABC):
    """Receives hyper-parameters and metric rows from the Trainer, on global rank 0 only.

    Metrics arrive as Python floats, at most every ``log_every_n_steps`` batches plus once per
    epoch/validation run: a logger never forces a device sync of its own.
    """

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def version(self) -> int | str: ...

    @property
    def log_dir(self) -> str | None:
        """Directory of this run's files, if the logger writes any."""
        return None

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def save(self) -> None:
        """Flush buffered rows (called before every checkpoint and at the end of a run)."""
        return None

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted")."""
        self.save()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this run's log (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run described by ``state`` (called when fit resumes from a checkpoint)."""
        return None
