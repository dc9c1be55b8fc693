"""Lightning's loop objects (``trainer.fit_loop``, ``validate_loop``, ``test_loop``, ``predict_loop``)
as views over ember's own state: each read computes its answer from ``trainer.state``,
``trainer.config`` and what the loops mark per batch (a training batch running, ``_in_batch``; an
evaluation pass's finished batches, ``_pass_batches``, and whether its running batch is its last,
``_pass_last``), so nothing is counted twice.

The progress counters answer as Lightning 2.6.6's do in ``on_train_batch_start``, inside
``training_step`` and the hooks around its backward and optimizer step, in ``on_train_batch_end``,
the validation hooks and the epoch-end hooks; evaluation and predict loops count their pass (over
all its loaders) in its batch hooks and steps too. Between two epochs (the next one's
``on_train_epoch_start``) and after the fit, the training ``current`` counts are the last epoch's,
as Lightning's (``LoopState.last_epoch_batches``). The differences left are listed in
docs/reference/trainer.md (several validation passes in one epoch, a resume after an epoch's end,
skipped batches, loaders without a length).
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


def _in_batch(trainer: Trainer) -> bool:
    """``training_step`` or a hook around its backward and optimizer step runs: the batch is
    started, ember's counters not yet advanced."""
    return trainer._in_batch and _in_fit_training(trainer) and not trainer._evaluation


def _after_batch(trainer: Trainer) -> bool:
    """A training batch's hooks run after ember advanced its counters (``on_train_batch_end``)."""
    state = trainer.state
    return (
        _in_fit_training(trainer)
        and not trainer._evaluation
        and not trainer._in_batch
        and not state.train_done
        and state.batch_idx > 0
        and trainer._metrics.fx == "training_step"
    )


def _in_epoch(trainer: Trainer) -> bool:
    """The fit's running epoch has started (its ``on_train_epoch_start`` was called)."""
    state = trainer.state
    if not _in_fit_training(trainer):
        return False
    if state.batch_idx > 0 or state.train_done or trainer._in_batch:
        return True
    return trainer._metrics.fx in ("on_train_epoch_start", "on_train_batch_start")


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
        elif _in_batch(trainer):
            current = Progress(done + 1, done + 1, done, done)
        elif _after_batch(trainer):
            current = Progress(done, done, done, done - 1)
        elif done == 0 and state.last_epoch_batches:  # between two epochs and after the fit: the last one's
            last, fit = state.last_epoch_batches, state.total_batch_idx
            counts = Progress(last, last, last, last)
            return BatchProgress(counts, Progress(fit, fit, fit, fit), trainer._is_last_batch)
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
    running (or last) pass and the batches it ran (so far, inside the pass)."""

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
        fx = trainer._metrics.fx
        if running and fx not in (f"on_{prefix}_epoch_end", f"on_{prefix}_end"):
            # Inside the pass: its finished batches (over all its loaders) and where in a batch we are
            ran = trainer._pass_batches
            if fx == f"on_{prefix}_batch_start":
                current = Progress(ran + 1, ran, ran, ran)
            elif fx == f"{prefix}_step":
                current = Progress(ran + 1, ran + 1, ran, ran)
            elif fx == f"on_{prefix}_batch_end":
                current = Progress(ran + 1, ran + 1, ran + 1, ran)
            else:  # its start hooks, before any batch
                current = Progress(ran, ran, ran, ran)
                return BatchProgress(current, current, False)
            return BatchProgress(current, current, trainer._pass_last)
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
