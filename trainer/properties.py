"""The Trainer's read-only view for users and callbacks (global_step, callback_metrics, log_dir ...)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from ember.accelerator import Accelerator
from ember.data import PreparedDataLoader
from ember.precision import Precision
from ember.strategies import Strategy
from ember.trainer.combined import PreparedCombinedLoader
from ember.trainer.config import TrainerConfig
from ember.trainer.lightning_names import LightningNames, LoopViews
from ember.trainer.loggers import Logger
from ember.trainer.loggers.base import VersionedLogger
from ember.trainer.logging import MetricStore
from ember.trainer.preemption import PreemptionGuard
from ember.trainer.profilers import PassThroughProfiler, Profiler
from ember.trainer.stage_flags import StageFlags

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.prediction import PredictionRecord

__all__ = ["TrainerProperties"]


class TrainerProperties(StageFlags, LightningNames, LoopViews):
    """Mixed into :class:`~ember.trainer.Trainer`: properties derived from its state, nothing stored here."""

    config: TrainerConfig
    accelerator: Accelerator
    loggers: list[Logger]
    default_root_dir: str
    callbacks: list[Any]
    num_training_batches: int | float
    _metrics: MetricStore
    _progress_bar_values: dict[str, float]
    _progress_bar_stale: bool
    _module: TrainModule | None
    _datamodule: Any
    _model: torch.nn.Module | None
    _step_optimizers: list[Any]
    _train_loader: PreparedDataLoader | PreparedCombinedLoader | None
    _val_loaders: list[PreparedDataLoader]
    _test_loaders: list[PreparedDataLoader]
    _predict_loaders: list[PreparedDataLoader]
    _preemption: PreemptionGuard
    _callbacks: list[Any]  # the Trainer's own and the defaults (``callbacks`` adds the module's, per stage)
    _prediction_record: PredictionRecord | None
    _is_last_batch: bool
    _stepping: bool  # the running training batch steps the optimizer (trainer/loops.py)
    _in_batch: bool  # inside a training batch, between on_train_batch_start and its counters' advance
    _pass_batches: int  # the running evaluation / predict pass's finished batches
    _pass_last: bool  # its running batch is its last (of its last loader)
    _row_due: bool  # its logger row is due, should_stop aside
    should_stop: bool

    # -- what users and callbacks read ----------------------------------------------------------
    @property
    def module(self) -> TrainModule:
        if self._module is None:
            raise RuntimeError("the Trainer has no module yet: call fit/validate/test/predict first")
        return self._module

    @property
    def model(self) -> torch.nn.Module:
        """The prepared (strategy-wrapped) module the loops run through."""
        if self._model is None:
            raise RuntimeError("the Trainer has no prepared model yet: call fit/validate/test/predict first")
        return self._model

    @property
    def strategy(self) -> Strategy:
        return self.accelerator.strategy

    @property
    def precision(self) -> Precision:
        return self.accelerator.precision

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        return self.state.epoch

    @property
    def total_batch_idx(self) -> int:
        return self.state.total_batch_idx

    @property
    def global_rank(self) -> int:
        return self.accelerator.process_index

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def num_devices(self) -> int:
        """Processes (devices) on each node."""
        return self.accelerator.strategy._num_processes

    @property
    def node_rank(self) -> int:
        return self.accelerator.strategy.node_rank

    @property
    def is_global_zero(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def max_epochs(self) -> int | None:
        return self.config.max_epochs

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    # -- the Trainer's settings, under Lightning's attribute names (as resolved: fast_dev_run's limits)
    @property
    def min_epochs(self) -> int | None:
        return self.config.min_epochs

    @property
    def min_steps(self) -> int | None:
        return self.config.min_steps

    @property
    def fast_dev_run(self) -> bool | int:
        return self.config.fast_dev_run

    @property
    def num_sanity_val_steps(self) -> int | float:
        """Validation batches per loader the sanity check runs; ``-1`` (all) reads as ``inf``, as Lightning's."""
        steps = self.config.num_sanity_val_steps
        return math.inf if steps == -1 else steps

    @property
    def limit_train_batches(self) -> int | float:
        return self.config.limit_train_batches

    @property
    def limit_val_batches(self) -> int | float:
        return self.config.limit_val_batches

    @property
    def limit_test_batches(self) -> int | float:
        return self.config.limit_test_batches

    @property
    def limit_predict_batches(self) -> int | float:
        return self.config.limit_predict_batches

    @property
    def gradient_clip_val(self) -> float | None:
        return self.config.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str | None:
        """As given to the Trainer: None when not set (clipping is then by norm)."""
        return self.config.gradient_clip_algorithm

    @property
    def lightning_module(self) -> TrainModule:
        """The module (Lightning's name for :attr:`module`)."""
        return self.module

    @property
    def log_every_n_steps(self) -> int:
        return self.config.log_every_n_steps

    @property
    def logs_this_batch(self) -> bool:
        """In the hooks of a training batch: whether the Trainer writes a logger row after it (every
        ``log_every_n_steps``-th batch that steps the optimizer, and the one where ``should_stop`` is
        set), for callbacks that log with the Trainer's rows::

            if trainer.logs_this_batch:
                trainer.log_metrics(my_statistics(), step=trainer.global_step)
        """
        return self._row_due or (self._stepping and self.should_stop)

    @property
    def profiler(self) -> Profiler:
        """The ``profiler=`` argument's :class:`Profiler`, else a :class:`PassThroughProfiler`
        (records nothing): ``with trainer.profiler.profile("my step"):`` works either way."""
        profiler: Profiler | None = self.config.profiler
        return profiler if profiler is not None else PassThroughProfiler()

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, float]:
        """The last value of each name logged with ``logger=True`` in the running (or last) stage, as
        Lightning's: also of the batches that wrote no logger row, and without a logger; not the
        ``epoch`` each row gets. Converted to floats on each read (device-to-host copies)."""
        return {key: float(value) for key, value in self._metrics.logged_values().items()}

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """Values logged with ``prog_bar=True`` as floats.

        They are converted (a device-to-host copy, which waits for the device) only when the loggers
        get a row — every ``log_every_n_steps`` and at epoch ends — and on the first read; between
        those, a progress bar redraws the last converted values.
        """
        if self._progress_bar_stale:
            self._progress_bar_values = {k: float(v) for k, v in self._metrics.progress_bar.items()}
            self._progress_bar_stale = False
        return dict(self._progress_bar_values)

    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @logger.setter
    def logger(self, logger: Logger | None) -> None:
        """``trainer.logger = ...`` (Lightning's): the only logger from now on; None: no logger."""
        if logger is not None and not isinstance(logger, Logger):
            raise TypeError(
                f"trainer.logger = {type(logger).__name__}(...): expected an ember Logger or None"
            )
        self.loggers = [logger] if logger is not None else []

    @property
    def log_dir(self) -> str | None:
        if not self.loggers:
            return self.default_root_dir
        first = self.loggers[0]
        # As Lightning: a CSV or TensorBoard logger's version folder, another logger's save_dir (a W&B
        # run's folder only exists on rank 0, from when the run opens: its save_dir is there from the start).
        if isinstance(first, VersionedLogger) or first.save_dir is None:
            return first.log_dir
        return first.save_dir

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in self._step_optimizers]

    @property
    def train_dataloader(self) -> Any:
        """The prepared training loader; several (a ``CombinedLoader``): them, shaped as given (as Lightning)."""
        loader = self._train_loader
        return loader.iterables if isinstance(loader, PreparedCombinedLoader) else loader

    @property
    def val_dataloaders(self) -> list[PreparedDataLoader]:
        return self._val_loaders

    @property
    def test_dataloaders(self) -> list[PreparedDataLoader]:
        """The loaders of the last ``test()``, prepared (empty before one ran)."""
        return self._test_loaders

    @property
    def predict_dataloaders(self) -> list[PreparedDataLoader]:
        """The loaders of the last ``predict()``, prepared (empty before one ran)."""
        return self._predict_loaders

    @property
    def interrupted(self) -> bool:
        """The last fit/validate/test/predict ended in an exception: ``KeyboardInterrupt``, a
        pre-emption (:class:`~ember.trainer.preemption.Preempted`) or an error. Already True in
        ``on_exception``; False again when the next stage starts."""
        return self._interrupted

    @property
    def received_sigterm(self) -> bool:
        """The running (or last) fit received SIGTERM; it stops at the next step boundary."""
        return self._preemption.catcher.sigterm

    @property
    def progress_bar_callback(self) -> Any:
        """The progress bar among the callbacks (a ``RichProgressBar``, ``TQDMProgressBar`` ...), or None."""
        return next((c for c in self.callbacks if c.progress_bar), None)

    @property
    def val_check_interval(self) -> int | float | timedelta:
        """A number of batches (an int), a fraction of the epoch (a float), or a time (a timedelta)."""
        interval = self.config.val_check_interval
        if self.config.val_check_time is not None:  # (given as a string, a dict or a timedelta)
            return self.config.val_check_time
        assert isinstance(interval, (int, float))
        return interval

    @property
    def check_val_every_n_epoch(self) -> int | None:
        return self.config.check_val_every_n_epoch

    @property
    def datamodule(self) -> Any:
        """The DataModule of the running (or last) stage, or None."""
        return self._datamodule

    @property
    def prediction_record(self) -> PredictionRecord | None:
        """During ``predict`` with a :class:`~ember.callbacks.BasePredictionWriter` among the
        callbacks: each process's own outputs and the dataset indices of their samples. Else None."""
        return self._prediction_record

    @property
    def checkpoint_callbacks(self) -> list[Any]:
        from ember.callbacks.model_checkpoint import ModelCheckpoint

        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def early_stopping_callback(self) -> Any:
        from ember.callbacks.early_stopping import EarlyStopping

        return next((c for c in self.callbacks if isinstance(c, EarlyStopping)), None)

    @property
    def checkpoint_callback(self) -> Any:
        """The first of :attr:`checkpoint_callbacks`, or None."""
        checkpoints = self.checkpoint_callbacks
        return checkpoints[0] if checkpoints else None

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches per optimizer step; settable between epochs (``GradientAccumulationScheduler``)."""
        return self.config.accumulate_grad_batches

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, batches: int) -> None:
        module = self._module
        if batches != 1 and module is not None and not module.automatic_optimization:
            raise ValueError(
                "accumulate_grad_batches > 1 needs automatic optimization; accumulate yourself in manual mode"
            )
        self.accelerator.gradient_accumulation_steps = batches  # (validated there)
        self.config.accumulate_grad_batches = batches

    def _reduce_logged(self, tensor: torch.Tensor, op: str, group: Any = None) -> torch.Tensor:
        """``self.log(..., sync_dist=True)``'s all-reduce: across every process, or within
        ``sync_dist_group``, a ``torch.distributed`` process group."""
        if group is None:
            reduced: torch.Tensor = self.accelerator.reduce(tensor, op)  # type: ignore[arg-type]
            return reduced
        return self.strategy.all_reduce(tensor, op, group=group)  # type: ignore[arg-type]

    # -- what is running (Lightning's stage flags) --------------------------------------------------
    @property
    def training(self) -> bool:
        """A fit is running, outside its validation and sanity check: from its ``setup`` to its
        ``teardown``, as Lightning's flag."""
        return self._running == "fit" and not self._evaluation and not self.sanity_checking

    @property
    def validating(self) -> bool:
        """Validation is running: ``validate()`` (from its ``setup`` to its ``teardown``), or inside a
        fit (not the sanity check)."""
        return (self._evaluation == "validation" or self._running == "validate") and not self.sanity_checking

    @property
    def testing(self) -> bool:
        return self._running == "test"

    @property
    def predicting(self) -> bool:
        return self._running == "predict"

    @property
    def is_last_batch(self) -> bool:
        """The training batch running now is its epoch's last."""
        return self._is_last_batch

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps the fit will take (for sizing schedules), from max_steps or epochs x batches;
        infinity when neither bounds it (an iterable dataset without max_steps)."""
        batches = self.num_training_batches
        per_epoch = (
            batches if math.isinf(batches) else math.ceil(batches / self.config.accumulate_grad_batches)
        )
        epochs = self.config.max_epochs
        # (max_epochs=0 counts one epoch, as Lightning's: a schedule sized by it is never 0 steps long)
        by_epochs = per_epoch * max(epochs, 1) if epochs not in (None, -1) else math.inf
        return min(self.config.max_steps, by_epochs) if self.config.max_steps != -1 else by_epochs
