"""When ``ModelCheckpoint`` saves at the end of a training batch: ``every_n_train_steps`` or
``train_time_interval`` due, and whether that save waits for the validation run that gives its
``monitor`` (Lightning 2.6's deferral)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ember.callbacks.base import acts_at_train_epoch_end

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint
    from ember.trainer.trainer import Trainer

__all__ = ["batch_due", "waits_for_validation"]


def batch_due(callback: ModelCheckpoint, trainer: Trainer) -> bool:
    """Whether a checkpoint is due after this batch: ``global_step`` a multiple of
    ``every_n_train_steps``, or ``train_time_interval`` passed since the fit started or the clock
    last restarted (restarted now when it did; global rank 0's clock decides for every process)."""
    n = callback.every_n_train_steps
    if n and trainer.global_step % n == 0:
        return True
    if callback.train_time_interval is None:
        return False
    now = time.monotonic()
    start = callback._last_time if callback._last_time is not None else now
    due = now - start >= callback.train_time_interval.total_seconds()
    if trainer.world_size > 1:  # every process saves, or none does
        flag = torch.tensor([float(due)], device=trainer.accelerator.device)
        due = bool(trainer.strategy.broadcast(flag, 0).item())
    if due:
        callback._last_time = now
    return due


def waits_for_validation(callback: ModelCheckpoint, trainer: Trainer) -> bool:
    """Whether a batch's checkpoint waits for the end of the next validation run, as in Lightning
    2.6: its ``monitor`` was not logged yet (before the fit's first validation run; after one, the
    save goes on and reports the missing name), or the checkpoints are saved after each validation
    run and one follows this epoch's last batch (its values are fresher than the previous run's)."""
    if callback.monitor is None:
        return False
    if callback.monitor not in trainer.callback_metrics:
        return not callback._validated
    if acts_at_train_epoch_end(trainer, callback.save_on_train_epoch_end) or not trainer.is_last_batch:
        return False
    every = trainer.check_val_every_n_epoch
    return any(trainer.num_val_batches) and (every is None or (trainer.current_epoch + 1) % every == 0)
