"""The clock of a time-based ``val_check_interval`` (a ``timedelta``, ``"DD:HH:MM:SS"`` or a dict):
validation is due once that much wall-clock time has passed since the training started or the
last validation ended (Lightning 2.6's rule; the validation's own time does not count)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["ValClock"]


class ValClock:
    """Asked after a training batch whether validation is due; every process gets rank 0's answer.

    ``_now`` is the time source (``time.monotonic``); a test may put a fake one there.
    """

    __slots__ = ("_decided", "_interval", "_last", "_now")

    def __init__(self, interval: timedelta) -> None:
        self._interval = interval.total_seconds()
        self._now: Callable[[], float] = time.monotonic
        self._last = 0.0
        self._decided: tuple[int, bool] = (-1, False)  # (total_batch_idx, the answer for it)

    @classmethod
    def of(cls, interval: timedelta | None) -> ValClock | None:
        """The clock of a time-based ``val_check_interval`` (``TrainerConfig.val_check_time``), else None."""
        return None if interval is None else cls(interval)

    def start(self) -> None:
        """At the start of a fit's training, a resumed one too: the clock is not saved in checkpoints."""
        self._last = self._now()
        self._decided = (-1, False)

    def restart(self) -> None:
        """After a validation run, its end hooks (a checkpoint saved there) included."""
        self._last = self._now()

    def due(self, trainer: Trainer) -> bool:
        """Whether validation runs after the batch just finished. Asked twice for one batch (the
        epoch's end asks again after a stop request), it answers the same without asking the clock."""
        batch = trainer.state.total_batch_idx
        if self._decided[0] == batch:
            return self._decided[1]
        due = self._now() - self._last >= self._interval
        if trainer.world_size > 1:
            # Clocks differ between processes; if each decided alone, one would validate (a collective
            # in its sync_dist or its checkpoint) while another trains: a hang. Rank 0 decides for all.
            flag = trainer.strategy.broadcast(torch.tensor([int(due)]), 0)
            due = bool(flag.item())
        self._decided = (batch, due)
        return due
