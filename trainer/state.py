"""The fit loop's counters: one small object, checkpointed as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoopState", "SearchFinished"]


class SearchFinished(Exception):
    """Raised by the finder callback of a ``Tuner`` once it searched: the run ends there, as a success
    (here, not in ``tuner.py``: the Trainer catches it, and a fit does not load the Tuner)."""


@dataclass(kw_only=True, slots=True)
class LoopState:
    """Where the fit loop is. A checkpoint taken at any hook resumes at the next unit of work.

    ``epoch`` is the running (or next) epoch; within it, ``batch_idx`` training batches are done,
    then ``train_done``, ``val_done`` and ``epoch_done`` mark the end-of-epoch phases as finished.

    ``fn``, ``stage`` and ``status`` (with ``finished`` and ``stopped``) answer as Lightning's
    ``trainer.state`` does, as strings: ``if trainer.state.fn == "fit": ...``. ``fn``: the running
    (or last) entry point, ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``, None before the
    first. ``stage``: what runs now, ``"train"`` (the rest of a fit too: its setup, ``on_fit_end``
    ...), ``"sanity_check"``, ``"validate"``, ``"test"`` or ``"predict"``; None between stages.
    ``status``: ``"initializing"`` before the first stage, ``"running"``, then ``"finished"``, or
    ``"interrupted"`` from the ``on_exception`` of a stage that raised. The Trainer writes them when
    its stage flags change; they are not checkpointed.
    """

    epoch: int = 0
    global_step: int = 0  # optimizer steps
    batch_idx: int = 0  # training batches finished in this epoch
    total_batch_idx: int = 0  # training batches finished over all epochs
    # of those, the batches that ended an optimizer step (each batch under manual optimisation): the
    # count log_every_n_steps divides (Lightning's _batches_that_stepped)
    stepped_batches: int = 0
    train_done: bool = False
    val_done: bool = False
    epoch_done: bool = False
    # The batches of the epoch before (set by next_epoch; not checkpointed): Lightning's loop views
    # show its counts from its end until the next epoch's first batch, and after the fit.
    last_epoch_batches: int = field(default=0, init=False, repr=False, compare=False)
    # Lightning's trainer.state, as the Trainer's stage flags say (trainer/stage_flags.py writes them
    # whenever a flag changes); not checkpointed.
    fn: str | None = field(default=None, init=False, repr=False, compare=False)
    stage: str | None = field(default=None, init=False, repr=False, compare=False)
    status: str = field(default="initializing", init=False, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def stopped(self) -> bool:
        """The last stage ended: finished or interrupted."""
        return self.status in ("finished", "interrupted")

    def next_epoch(self) -> None:
        self.epoch += 1
        self.last_epoch_batches, self.batch_idx = self.batch_idx, 0
        self.train_done = self.val_done = self.epoch_done = False

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # (a checkpoint from before stepped_batches was saved: the optimizer steps, its usual value)
        state = {"stepped_batches": state["global_step"], **state}
        for counter in dataclasses.fields(self):
            if counter.init:
                setattr(self, counter.name, state[counter.name])
