"""Lightning's loop objects (``trainer.fit_loop``, ``validate_loop``, ``test_loop``, ``predict_loop``)
as views over ember's own state: each read computes its answer from ``trainer.state`` and
``trainer.config``, so nothing is stored twice and nothing runs per batch.

The progress counters answer as Lightning 2.6.6's do in ``on_train_batch_start``,
``on_train_batch_end``, the validation hooks and the epoch-end hooks. ember advances its counters
once per batch, so inside ``training_step`` (and the backward / optimizer hooks) they read as in
the last batch's ``on_train_batch_end``; at ``on_train_epoch_start`` of a later epoch and after the
fit the ``current`` batch counts read 0 (Lightning's still hold the last epoch's). Evaluation
loops count a whole pass: their ``batch_progress`` is known at ``on_*_epoch_end``, ``on_*_end``
and after the stage, and raises inside the pass's batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.trainer.config import _int
from ember.trainer.lightning_names import LoopViews  # (its home: a fit does not load this module)

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = [
    "BatchProgress", "EpochLoopView", "EvaluationLoopView", "FitLoopView", "LoopViews", "Progress", "ProgressPair",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Progress:
    """One of Lightning's trackers: events ``ready`` (about to start), ``started``, ``processed``
    and ``completed`` (their end hooks ran)."""

    ready: int = 0
    started: int = 0
    processed: int = 0
    completed: int = 0


@dataclass(frozen=True, slots=True)
class ProgressPair:
    """``current``: this epoch's (or pass's) counts; ``total``: the fit's (or the pass's)."""

    current: Progress
    total: Progress


@dataclass(frozen=True, slots=True)
class BatchProgress(ProgressPair):
    is_last_batch: bool = False


def _in_fit_training(trainer: Trainer) -> bool:
    return trainer._running == "fit" and not trainer.sanity_checking


def _after_batch(trainer: Trainer) -> bool:
    """A training batch's hooks run after ember advanced its counters (``on_train_batch_end``)."""
    state = trainer.state
    return (
        _in_fit_training(trainer)
        and not trainer._evaluation
        and not state.train_done
        and state.batch_idx > 0
        and trainer._metrics.fx == "training_step"
    )


def _in_epoch(trainer: Trainer) -> bool:
    """The fit's running epoch has started (its ``on_train_epoch_start`` was called)."""
    state = trainer.state
    if not _in_fit_training(trainer):
        return False
    fx = trainer._metrics.fx
    return state.batch_idx > 0 or state.train_done or fx in ("on_train_epoch_start", "on_train_batch_start",
                                                             "training_step")  # fmt: skip


class EpochLoopView:
    """``trainer.fit_loop.epoch_loop``: the training epoch's counters."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    @property
    def batch_progress(self) -> BatchProgress:
        trainer, state = self._trainer, self._trainer.state
        done = state.batch_idx
        if _in_fit_training(trainer) and trainer._metrics.fx == "on_train_batch_start":
            current = Progress(done + 1, done, done, done)
        elif _after_batch(trainer):
            current = Progress(done, done, done, done - 1)
        else:
            current = Progress(done, done, done, done)
        before = state.total_batch_idx - done  # the batches of the earlier epochs
        total = Progress(*(count + before for count in (current.ready, current.started,
                                                        current.processed, current.completed)))  # fmt: skip
        return BatchProgress(current, total, trainer._is_last_batch)

    @property
    def _batches_that_stepped(self) -> int:
        """Training batches that stepped the optimizer; the running one counts from after its
        ``on_train_batch_end`` and the validation after it (Lightning's logger step)."""
        trainer = self._trainer
        running = _after_batch(trainer) or (_in_fit_training(trainer) and trainer._evaluation == "validation")
        return trainer.state.stepped_batches - (1 if running and trainer._stepping else 0)

    @property
    def global_step(self) -> int:
        return self._trainer.state.global_step

    @property
    def total_batch_idx(self) -> int:
        return self.batch_progress.total.ready - 1

    @property
    def batch_idx(self) -> int:
        return self.batch_progress.current.ready - 1

    @property
    def min_steps(self) -> int | None:
        return self._trainer.config.min_steps

    @property
    def max_steps(self) -> int:
        return self._trainer.config.max_steps

    @max_steps.setter
    def max_steps(self, steps: int) -> None:
        _int("max_steps", steps, -1)  # (-1: no limit)
        self._trainer.config.max_steps = steps

    @property
    def val_loop(self) -> EvaluationLoopView:
        return EvaluationLoopView(self._trainer, "validation")


class FitLoopView:
    """``trainer.fit_loop``: epochs and limits of the fit. ``max_epochs`` may be assigned (as in
    Lightning, e.g. to train further before resuming): it sets the Trainer's setting."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    @property
    def max_epochs(self) -> int | None:
        return self._trainer.config.max_epochs

    @max_epochs.setter
    def max_epochs(self, epochs: int) -> None:
        _int("max_epochs", epochs, -1)  # (-1: no limit)
        self._trainer.config.max_epochs = epochs

    @property
    def min_epochs(self) -> int | None:
        return self._trainer.config.min_epochs

    @property
    def max_steps(self) -> int:
        return self._trainer.config.max_steps

    @property
    def min_steps(self) -> int | None:
        return self._trainer.config.min_steps

    @property
    def epoch_progress(self) -> ProgressPair:
        """``.current`` and ``.total`` (the same here): ``completed`` is ``trainer.current_epoch``."""
        trainer, epoch = self._trainer, self._trainer.state.epoch
        if not _in_epoch(trainer):
            progress = Progress(epoch, epoch, epoch, epoch)
        else:
            started = epoch + (trainer._metrics.fx != "on_train_epoch_start")
            # processed: the epoch's batches and its end-of-epoch validation are done
            processed = epoch + (trainer.state.val_done and not trainer._evaluation)
            progress = Progress(epoch + 1, started, processed, epoch)
        return ProgressPair(progress, progress)

    @property
    def epoch_loop(self) -> EpochLoopView:
        return EpochLoopView(self._trainer)

    @property
    def total_batch_idx(self) -> int:
        return self.epoch_loop.total_batch_idx

    @property
    def batch_idx(self) -> int:
        return self.epoch_loop.batch_idx


_STAGES = {"validation": "validate", "validate": "validate", "test": "test", "predict": "predict"}


class EvaluationLoopView:
    """``val_loop`` / ``validate_loop`` / ``test_loop`` / ``predict_loop``: the loaders of the
    running (or last) pass and, from its end hooks on, the batches it ran."""

    def __init__(self, trainer: Trainer, kind: str) -> None:
        self._trainer, self._kind = trainer, kind

    @property
    def dataloaders(self) -> list[Any]:
        trainer = self._trainer
        if self._kind in ("validation", "validate"):
            return trainer.val_dataloaders
        return trainer.test_dataloaders if self._kind == "test" else trainer.predict_dataloaders

    @property
    def batch_progress(self) -> BatchProgress:
        trainer, kind = self._trainer, self._kind
        prefix = "validation" if kind == "validate" else kind
        running = trainer._evaluation == prefix or trainer._running == _STAGES[kind]
        if running and trainer._metrics.fx not in (f"on_{prefix}_epoch_end", f"on_{prefix}_end"):
            raise RuntimeError(
                f"{kind} loop's batch_progress is known from on_{prefix}_epoch_end on: ember does not count "
                f"the batches of a running pass; use the batch_idx argument of the on_{prefix}_batch_* hooks"
            )
        if kind == "test":
            counts = trainer.num_test_batches
        elif kind == "predict":
            counts = trainer.num_predict_batches
        else:
            counts = trainer._sanity_limits() if trainer.sanity_checking else trainer.num_val_batches
        batches = sum(counts)
        if math.isinf(batches):
            raise RuntimeError(f"{kind} loop's batch_progress is unknown: a loader has no length")
        done = Progress(int(batches), int(batches), int(batches), int(batches))
        return BatchProgress(done, done, is_last_batch=batches > 0)
