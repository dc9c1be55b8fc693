"""When the training loop stops or validates: ``should_stop``'s minimums (``min_epochs``,
``min_steps``) and the validation schedule (``check_val_every_n_epoch``, ``val_check_interval``,
time-based intervals), as Lightning 2.6 decides them. Asked by :mod:`ember.trainer.loops`."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["may_stop", "stopped_mid_epoch", "validate_at_epoch_end", "validate_mid_epoch", "validation_epoch"]


def may_stop(trainer: Trainer) -> bool:
    """Whether ``should_stop`` may end the fit now, within an epoch or between two: ``min_epochs``
    finished epochs and ``min_steps`` optimizer steps are done (until then the request waits)."""
    config, state = trainer.config, trainer.state
    may = (config.min_epochs is None or state.epoch >= config.min_epochs) and (
        config.min_steps is None or state.global_step >= config.min_steps
    )
    if not may and trainer.should_stop and not trainer._deferred_stop_noted:  # (once, as Lightning)
        trainer._deferred_stop_noted = True
        if trainer.is_global_zero:
            print(f"ember: trainer.should_stop was set, but min_epochs={config.min_epochs} and min_steps="
                  f"{config.min_steps} are not reached: training continues", file=sys.stderr, flush=True)  # fmt: skip
    return may


def validate_mid_epoch(trainer: Trainer, batch_idx: int, is_last: bool) -> bool:
    """Whether validation runs after this batch, in an epoch that validates (``Epoch.validates``)."""
    if trainer._val_clock is not None:  # time-based: the epoch's last batch asks at the epoch's end
        return not is_last and trainer._val_clock.due(trainer)
    if trainer.config.check_val_every_n_epoch is None:  # count training batches across epochs
        return trainer.state.total_batch_idx % trainer._val_check_batch == 0
    return not is_last and (batch_idx + 1) % trainer._val_check_batch == 0


def validation_epoch(trainer: Trainer) -> bool:
    every = trainer.config.check_val_every_n_epoch or 1
    return (trainer.state.epoch + 1) % every == 0 and any(limit > 0 for limit in trainer._val_limits())


def validate_at_epoch_end(trainer: Trainer) -> bool:
    state = trainer.state
    if not trainer._val_loaders or not validation_epoch(trainer) or state.batch_idx == 0:
        return False
    if trainer.should_stop and may_stop(trainer):
        # As Lightning: a granted stop request validates after the batch it came in, unless the
        # val_check_interval validation after that batch ran (once per end of an epoch, not per batch).
        return not validate_mid_epoch(trainer, state.batch_idx - 1, trainer._is_last_batch)
    if stopped_mid_epoch(trainer):
        return False
    if trainer._val_clock is not None:  # (as Lightning: no validation at an epoch's end unless due)
        return trainer._val_clock.due(trainer)
    if trainer.config.check_val_every_n_epoch is None:
        return False
    if isinstance(trainer.config.val_check_interval, float) and math.isinf(trainer.num_training_batches):
        return True  # (1.0 on data without a length: the end of the epoch is its only check)
    # As Lightning, a fraction too: every int(batches x fraction) batches, so at the epoch's end only
    # when that count divides the epoch's batches (0.3 of 10: after batches 3, 6 and 9, not 10).
    return trainer.state.batch_idx % trainer._val_check_batch == 0


def stopped_mid_epoch(trainer: Trainer) -> bool:
    """The epoch ended before its last batch (``max_steps`` reached, or ``on_train_batch_start``
    returned -1): as in Lightning, no epoch-end validation runs then (a mid-epoch
    ``val_check_interval`` still did). A granted ``should_stop`` validates: ``validate_at_epoch_end``."""
    limit, state = trainer.num_training_batches, trainer.state
    if not math.isinf(limit):
        return state.batch_idx < limit
    return trainer.config.max_steps != -1 and state.global_step >= trainer.config.max_steps
