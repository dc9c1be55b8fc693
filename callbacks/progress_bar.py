"""``ProgressBar``: the base of progress bars (Lightning's), for bars of your own and the built-ins."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """The base class of progress bars (``RichProgressBar``, ``TQDMProgressBar``), as Lightning's.

    A callback of this class replaces the Trainer's default bar. It gives a bar what it needs to
    draw: :attr:`trainer`, the batch counts (``total_*``, ``inf`` for data of unknown length), the
    metrics to show (:meth:`get_metrics`: override it to change them), the stage descriptions, and
    :meth:`enable` / :meth:`disable` (:meth:`setup` disables it on every process but global rank 0).

    Example::

        class Percent(ProgressBar):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if self.is_enabled:
                    print(f"{100 * (batch_idx + 1) / self.total_train_batches:.0f}%", end="\\r")
    """

    progress_bar = True
    # Class defaults: a subclass need not call ``__init__``.
    _trainer: Trainer | None = None
    _disabled = False
    _current_eval_dataloader_idx: int | None = None

    @property
    def trainer(self) -> Trainer:
        """The Trainer this bar draws for (set in :meth:`setup`)."""
        if self._trainer is None:
            raise TypeError(
                f"{type(self).__name__}.trainer is not set yet: it is set when a Trainer stage starts"
            )
        return self._trainer

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._trainer = trainer
        if not trainer.is_global_zero:  # one process draws (Lightning's): is_enabled says so to every bar
            self.disable()

    # -- on and off -------------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def disable(self) -> None:
        """Draw nothing from the next batch on, until :meth:`enable`."""
        self._disabled = True
        self._on_toggle()

    def enable(self) -> None:
        self._disabled = False
        self._on_toggle()

    def _on_toggle(self) -> None:
        """Forget what a bar decided about drawing (the built-ins keep it per stage)."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print without breaking the bar (here: ``print``; the built-in bars print above theirs)."""
        print(*args, **kwargs)

    # -- what to show -----------------------------------------------------------------------------
    def get_metrics(self, trainer: Trainer, module: TrainModule) -> dict[str, Any]:
        """The values shown beside the bar, as Lightning's: ``v_num``, the logger's version (with a
        logger), then ``trainer.progress_bar_metrics`` (what ``self.log(..., prog_bar=True)`` logged).
        Read only when the bar is drawn. Override it to change them::

            def get_metrics(self, trainer, module):
                return {k: v for k, v in super().get_metrics(trainer, module).items() if k != "v_num"}
        """
        standard = _standard_metrics(trainer)
        logged = trainer.progress_bar_metrics
        if clash := [name for name in standard if name in logged]:
            warnings.warn(
                f"The progress bar shows {clash[0]!r} (the logger's version) already: the value logged with"
                f" self.log({clash[0]!r}, ..., prog_bar=True) replaces it. Rename the value, or override"
                f" {type(self).__name__}.get_metrics()",
                UserWarning,
                stacklevel=2,
            )
        return {**standard, **logged}

    @property
    def train_description(self) -> str:
        return "Training"

    @property
    def validation_description(self) -> str:
        return "Validation"

    @property
    def test_description(self) -> str:
        return "Testing"

    @property
    def predict_description(self) -> str:
        return "Predicting"

    @property
    def sanity_check_description(self) -> str:
        return "Sanity Checking"

    # -- counts -----------------------------------------------------------------------------------
    @property
    def total_train_batches(self) -> int | float:
        """The training batches of this epoch (fewer when ``max_steps`` ends the fit first without
        ``max_epochs``)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            return min(batches, trainer.max_steps - trainer.global_step)
        return batches

    @property
    def total_val_batches(self) -> int | float:
        """The validation batches of a validation run, every dataloader together."""
        return sum(self._val_counts())

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        return self._current(self._val_counts())

    def _val_counts(self) -> list[int | float]:
        """Each validation dataloader's batches in this run: the sanity check's while it runs."""
        trainer = self.trainer
        return trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        return self._current(self.trainer.num_test_batches)

    @property
    def total_predict_batches_current_dataloader(self) -> int | float:
        return self._current(self.trainer.num_predict_batches)

    def _current(self, counts: list[int | float]) -> int | float:
        index = self._current_eval_dataloader_idx or 0
        return counts[index] if index < len(counts) else 0

    def has_dataloader_changed(self, dataloader_idx: int) -> bool:
        """Note ``dataloader_idx`` as the current evaluation dataloader; whether it changed."""
        changed = self._current_eval_dataloader_idx != dataloader_idx
        self._current_eval_dataloader_idx = dataloader_idx
        return changed

    def reset_dataloader_idx_tracker(self) -> None:
        self._current_eval_dataloader_idx = None


def _standard_metrics(trainer: Trainer) -> dict[str, int | str]:
    """``{"v_num": version}`` of the Trainer's loggers (Lightning's): one logger's version (a string:
    its last 4 characters), several loggers' distinct versions joined by ``_``; none: ``{}``."""
    loggers = trainer.loggers
    if not loggers:
        return {}
    if len(loggers) == 1:
        version: int | str | None = loggers[0].version
    else:
        version = "_".join(dict.fromkeys(str(logger.version) for logger in loggers))
    if version is None or version == "":
        return {}
    return {"v_num": version[-4:] if isinstance(version, str) else version}
