"""The fit loop's counters: one small object, checkpointed as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["LoopState"]


@dataclass(kw_only=True, slots=True)
class LoopState:
    """Where the fit loop is. A checkpoint taken at any hook resumes at the next unit of work.

    ``epoch`` is the running (or next) epoch; within it, ``batch_idx`` training batches are done,
    then ``train_done``, ``val_done`` and ``epoch_done`` mark the end-of-epoch phases as finished.
    """

    epoch: int = 0
    global_step: int = 0  # optimizer steps
    batch_idx: int = 0  # training batches finished in this epoch
    total_batch_idx: int = 0  # training batches finished over all epochs
    train_done: bool = False
    val_done: bool = False
    epoch_done: bool = False

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_idx = 0
        self.train_done = self.val_done = self.epoch_done = False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])
