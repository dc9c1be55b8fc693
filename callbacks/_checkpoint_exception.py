"""``ModelCheckpoint(save_on_exception=True)``: when the fit raises, save a checkpoint named from
``filename`` (and ``last``), as Lightning 2.6; it is not ranked among the kept checkpoints."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ember.callbacks import _checkpoint_names as _names

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint
    from ember.trainer.trainer import Trainer

__all__ = ["save_on_exception"]


def _name(callback: ModelCheckpoint, trainer: Trainer) -> str:
    """``filename`` filled in; a field not logged yet reads ``nan`` (Lightning's reads 0), and a
    template that still cannot be filled gives ``epoch=E-step=S``: a failure must not stop the save."""
    metrics = _names.metrics_of(trainer)
    for name in _names.template_fields(callback.filename):
        if name not in ("epoch", "step"):
            metrics.setdefault(name, math.nan)
    try:
        return callback.format_name(metrics, trainer.current_epoch, trainer.global_step)
    except (KeyError, ValueError):
        return f"epoch={trainer.current_epoch}-step={trainer.global_step}"


def save_on_exception(callback: ModelCheckpoint, trainer: Trainer, exception: BaseException) -> None:
    """Save ``<dirpath>/<filename filled in>`` (``-vN`` past what exists) and, with ``save_last``,
    ``last``, when every process failed at the same point of ``fit`` (a save is a collective: see
    ``OnExceptionCheckpoint``). Not in a ``fast_dev_run``, nor at a step already saved."""
    from ember.callbacks.on_exception_checkpoint import failed_together
    from ember.trainer.preemption import Preempted  # (the Trainer's modules import the callbacks)

    if (
        trainer.stage != "fit"
        or trainer.fast_dev_run
        or trainer.sanity_checking
        or trainer.global_step == callback._last_step_saved
        or (isinstance(exception, Preempted) and exception.checkpoint is not None)
    ):
        return
    if not failed_together(trainer, exception, "ModelCheckpoint(save_on_exception=True)", callback.state_key):
        return
    path, last = "", ""
    if trainer.is_global_zero:  # rank 0 looks at the directory: every process saves there
        directory = Path(callback.resolved_dirpath(trainer))
        taken = set(callback.best_k_models)
        path = str(
            _names.free_path(directory, _name(callback, trainer), taken, callback.enable_version_counter)
        )
        try:
            last = callback.last_path(trainer, also_taken=[path]) if callback.save_last else ""
        except KeyError:  # CHECKPOINT_NAME_LAST with a field not logged yet: no `last` this time
            last = ""
    if trainer.world_size > 1:
        path, last = trainer.accelerator.broadcast_object((path, last))
    try:
        trainer.save_checkpoint(path, weights_only=callback.save_weights_only)
        if last:
            callback.last_model_path, callback._saved_last = last, True
            trainer.save_checkpoint(last, weights_only=callback.save_weights_only)
    except Exception as error:  # the fit's own exception is the one to raise
        warnings.warn(
            f"ModelCheckpoint(save_on_exception=True) could not save {path!r}: {error}", stacklevel=2
        )
        return
    callback._last_step_saved = trainer.global_step
    if trainer.is_global_zero:
        print(
            f"ember: the fit raised {type(exception).__name__} ({exception}); ModelCheckpoint saved {path} "
            f"(trainer.fit(..., ckpt_path={path!r}) resumes from it)",
            file=sys.stderr,
            flush=True,
        )
