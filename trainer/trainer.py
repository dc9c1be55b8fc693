"""``Trainer``: runs a ``TrainModule``'s fit / validate / test / predict on top of the Accelerator."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ember._rng import use_deterministic_algorithms
from ember._validation import DEFAULT_COLLECTIVE_TIMEOUT, check_bool
from ember.accelerator import Accelerator
from ember.callbacks.base import Callback
from ember.data import PreparedDataLoader
from ember.precision import Precision
from ember.strategies import Strategy
from ember.strategies.base import resolve_strategy
from ember.strategies.capabilities import OwnsOptimizerStep
from ember.strategies.environment import launch_defaults
from ember.trainer import checkpointing
from ember.trainer._arguments import INIT_DOC
from ember.trainer.attach import StageAttachment
from ember.trainer.callback_list import default_callbacks
from ember.trainer.combined import PreparedCombinedLoader
from ember.trainer.config import (
    TrainerConfig,
    as_list,
    check_sync_batchnorm,
    resolve_loggers,
    resolve_switches,
)
from ember.trainer.data import TrainerData, entry_arguments, find_train_loader
from ember.trainer.hooks import HookPlan, call_hook, overridden
from ember.trainer.hparams import logged_hparams
from ember.trainer.loggers import Logger
from ember.trainer.loggers._dummy import DummyLogger
from ember.trainer.loggers.base import share_versions
from ember.trainer.logging import MetricStore
from ember.trainer.loops import run_fit
from ember.trainer.metric_history import MetricHistory
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.optim import LRSchedulerConfig, count_manual_steps, parse_optimizers, step_schedulers
from ember.trainer.prediction import PredictionRecord
from ember.trainer.preemption import Preempted, PreemptionGuard
from ember.trainer.profilers import Profiler
from ember.trainer.profilers.timed import backward_call, end_stage, module_hook
from ember.trainer.properties import TrainerProperties
from ember.trainer.stages import EvaluationStages
from ember.trainer.state import LoopState, SearchFinished
from ember.trainer.step import backward
from ember.trainer.trainable import TrainableRefresh
from ember.trainer.val_clock import ValClock

__all__ = ["Trainer"]


class Trainer(
    TrainerProperties,
    TrainerData,
    StageAttachment,
    EvaluationStages,
    TrainableRefresh,
):
    """Fit, validate, test and predict a TrainModule on any strategy and precision.

    Example::

        trainer = Trainer(max_epochs=10, devices=2, strategy="ddp", precision="bf16-mixed")
        trainer.fit(model, train_loader, val_loader)

    During ``fit``, SIGTERM or SIGUSR1 saves the ``last`` checkpoint at the next step boundary and ends
    the process with status 75 (:class:`~ember.trainer.preemption.Preempted`). Arguments: ``__init__``.
    """

    def __init__(
        self,
        *,
        accelerator: str | None = None,
        strategy: str | Strategy | None = None,
        devices: int | str | Sequence[int] = "auto",
        num_nodes: int = 1,
        precision: str | int | Precision | None = None,
        max_epochs: int | None = None,
        max_steps: int = -1,
        min_epochs: int | None = None,
        min_steps: int | None = None,
        max_time: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        val_check_interval: int | float | str | timedelta | dict[str, int] = 1.0,
        check_val_every_n_epoch: int | None = 1,
        limit_train_batches: int | float = 1.0,
        limit_val_batches: int | float = 1.0,
        limit_test_batches: int | float = 1.0,
        limit_predict_batches: int | float = 1.0,
        num_sanity_val_steps: int | None = None,
        fast_dev_run: bool | int = False,
        log_every_n_steps: int | None = None,
        callbacks: list[Callback] | Callback | None = None,
        logger: Logger | list[Logger] | bool | None = None,
        enable_checkpointing: bool | None = None,
        enable_progress_bar: bool | None = None,
        enable_model_summary: bool | None = None,
        enable_autolog_hparams: bool = True,
        default_root_dir: str | os.PathLike[str] | None = None,
        deterministic: bool | str | None = None,
        detect_anomaly: bool = False,
        use_distributed_sampler: bool = True,
        seed: int | None = None,
        auto_resume: bool | None = None,
        non_finite: str | None = "stop",
        collective_timeout: float | timedelta | None = DEFAULT_COLLECTIVE_TIMEOUT,
        overfit_batches: int | float = 0.0,
        benchmark: bool | None = None,
        inference_mode: bool = True,
        sync_batchnorm: bool = False,
        reload_dataloaders_every_n_epochs: int = 0,
        profiler: str | Profiler | None = None,
        plugins: Precision | list[Precision] | None = None,
        barebones: bool = False,
        **unexpected: Any,
    ) -> None:
        TrainerConfig.check_names(list(unexpected))
        arguments = {k: v for k, v in locals().items() if k not in ("self", "unexpected", "__class__")}
        self.config = config = TrainerConfig(**resolve_switches(arguments))  # None: the default (or off)
        self.barebones = config.barebones  # self.log asks it on every call
        strategy = config.strategy if config.strategy is not None else launch_defaults().get("strategy")
        if isinstance(strategy, str) and strategy != "auto":  # ("auto" never needs training settings)
            strategy = resolve_strategy(strategy, world_size=1)
        if isinstance(strategy, Strategy):  # engines that clip inside their step learn it before launch
            strategy.configure_training(
                gradient_clip_val=config.gradient_clip_val,
                gradient_clip_algorithm=config.gradient_clip_algorithm or "norm",
            )
        check_sync_batchnorm(config)  # before the Accelerator starts any process
        self.accelerator = Accelerator(
            accelerator=config.accelerator, strategy=strategy, devices=config.devices,
            precision=config.precision, gradient_accumulation_steps=config.accumulate_grad_batches, seed=config.seed,
            collective_timeout=config.collective_timeout,
        )  # fmt: skip
        if self.accelerator.num_processes % config.num_nodes:
            raise ValueError(
                f"num_nodes={config.num_nodes} does not divide the {self.accelerator.num_processes} processes "
                "of this run; start several nodes with `ember launch --nnodes N`"
            )
        if config.benchmark is not None or config.deterministic:
            if config.benchmark and config.deterministic:
                warnings.warn(
                    "benchmark=True lets cuDNN pick its fastest algorithms, which deterministic=True rules out: "
                    "the run may not be reproducible",
                    stacklevel=2,
                )
            torch.backends.cudnn.benchmark = bool(config.benchmark)
        # As Lightning: "~" expanded and the path normalized ("runs/../x" is "x").
        self.default_root_dir = os.path.normpath(os.path.expanduser(config.default_root_dir or os.getcwd()))
        self._backward_pass = backward_call(self)  # accelerator.backward, timed under a profiler
        loggers = resolve_loggers(config.logger, self.default_root_dir)  # (a logger writes nothing when made)
        # fast_dev_run, as Lightning: a logger that writes nothing, where one was asked for.
        self.loggers = ([DummyLogger()] if loggers else []) if config.fast_dev_run else loggers
        self._hook_plan = HookPlan()  # which callbacks define which hook, for call_hook
        self._callbacks = default_callbacks(self, as_list(config.callbacks))
        # The given ones and the defaults; each stage adds the module's (configure_callbacks).
        self.callbacks: list[Callback] = list(self._callbacks)
        self.state = LoopState()  # (fn, stage, status: written by the stage flags below, StageFlags)
        self.should_stop = False
        self.sanity_checking = False
        self.stage = ""
        self._running, self._evaluation, self._is_last_batch = "", "", False  # (the stage flags' answers)
        self._in_batch, self._pass_batches, self._pass_last = False, 0, False  # (progress: loop_views)
        # The running training batch steps the optimizer; its logger row is due (logs_this_batch).
        self._stepping, self._row_due, self._row_pending = False, False, False  # (_row_pending: _flush_row)
        self._progress_bar_values: dict[str, float] = {}
        self._progress_bar_stale = True  # converted on the next read of progress_bar_metrics
        self.metric_history = MetricHistory()  # extremes of every logged row, for the end-of-fit summary
        self._metrics = MetricStore(self._reduce_logged)  # (sync_dist's all-reduce: properties.py)
        self._module: TrainModule | None = None
        self._datamodule: DataModule | None = None
        self._model: torch.nn.Module | None = None
        self._prediction_record: PredictionRecord | None = None  # during a predict with a writer
        self._step_optimizers: list[Any] = []
        self._optimizer_hooks: list[Any] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self._train_loader: PreparedDataLoader | PreparedCombinedLoader | None = None
        self._val_loaders: list[PreparedDataLoader] = []
        self._test_loaders: list[PreparedDataLoader] = []  # the last test()'s loaders
        self._predict_loaders: list[PreparedDataLoader] = []  # the last predict()'s
        self._interrupted = False  # the last stage ended in an exception (Lightning's `interrupted`)
        self._sources: tuple[Any, Any, DataModule | None] = (None, None, None)  # where fit found its data
        self._val_check_batch, self._val_clock = 1, ValClock.of(config.val_check_time)  # (loops.py)
        self._resumed = False
        self._preemption = PreemptionGuard()
        self.num_training_batches: int | float = 0
        self.num_val_batches: list[int | float] = []  # fit's, or the running validate()'s
        self.num_test_batches: list[int | float] = []  # the last test()'s, per loader
        self.num_predict_batches: list[int | float] = []  # the last predict()'s
        if config.deterministic:
            use_deterministic_algorithms(warn_only=config.deterministic == "warn")
        elif config.deterministic is False:  # passed: the global mode off, as Lightning (None leaves it)
            torch.use_deterministic_algorithms(False)
        if max_epochs is None and config.max_epochs == 1000 and self.is_global_zero:
            warnings.warn(
                "max_epochs was not set: the fit stops after 1000 epochs (Lightning's default); set "
                "max_epochs=-1 to train without an epoch limit",
                stacklevel=2,
            )
        self._deferred_stop_noted = False  # min_epochs/min_steps deferred a stop request: said once

    __init__.__doc__ = INIT_DOC  # (in _arguments.py: one line per argument, too long for this file)

    # -- entry points -------------------------------------------------------------------------------
    def fit(self, module: TrainModule | None = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: DataModule | None = None, ckpt_path: str | os.PathLike[str] | None = None, *,
            model: TrainModule | None = None) -> None:  # fmt: skip
        """Train ``module``; ``ckpt_path`` (a checkpoint directory or ``"last"``) resumes exactly.

        Without ``ckpt_path``, ``auto_resume`` may pick the newest valid checkpoint (see ``__init__``).
        Lightning's forms work too: ``model=`` for ``module``, a DataModule in place of the loaders.
        """
        module, train_dataloaders, datamodule = entry_arguments(
            "fit", module, model, train_dataloaders, datamodule
        )
        if module is None:
            raise TypeError("fit() needs a module: trainer.fit(module, train_dataloaders, ...)")
        with self._entering("fit"):
            self._fit(module, train_dataloaders, val_dataloaders, datamodule, ckpt_path)

    def _fit(self, module: TrainModule, train_dataloaders: Any, val_dataloaders: Any,
             datamodule: DataModule | None, ckpt_path: str | os.PathLike[str] | None) -> None:  # fmt: skip
        self._attach(module, "fit", datamodule)
        checkpoint: Path | None
        if ckpt_path is not None:
            checkpoint = checkpointing.resolve_path(self, ckpt_path)
        else:
            checkpoint = (
                checkpointing.newest_valid(self) if checkpointing.resumes_automatically(self) else None
            )
            if checkpoint is not None and self.is_global_zero:
                print(f"ember: resuming automatically from {checkpoint}", file=sys.stderr, flush=True)
        if not module.automatic_optimization and self.config.accumulate_grad_batches > 1:
            raise ValueError(
                "accumulate_grad_batches > 1 needs automatic optimization; accumulate yourself in manual mode"
            )
        if not module.automatic_optimization and self.config.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val works with automatic optimization; in manual mode clip in training_step with "
                "self.clip_gradients(optimizer, gradient_clip_val=..., gradient_clip_algorithm=...)"
            )
        with self.accelerator.init_module(empty_init=True):  # FSDP: layers on meta, materialised as shards
            module_hook(self, "configure_model")()  # (timed under a profiler, as the other hooks)
        # After configure_model (as Lightning: a loader may need what it built), before
        # configure_optimizers, which may size a schedule with estimated_stepping_batches.
        train = find_train_loader(self.config, module, train_dataloaders, datamodule)
        val = self._loaders("val", val_dataloaders, datamodule)
        self._sources = (train_dataloaders, val_dataloaders, datamodule)  # for _reload_loaders
        self._train_loader = self._prepare_train(train)
        self._val_loaders = [self._prepare_loader(v, i, evaluation=True) for i, v in enumerate(val)]
        self._set_batch_counts()
        optimizers, self.lr_scheduler_configs = parse_optimizers(
            module_hook(self, "configure_optimizers")(),
            custom_step=overridden(module, "lr_scheduler_step") is not None,
        )
        if module.automatic_optimization and len(optimizers) != 1:
            raise ValueError(f"automatic optimization needs exactly one optimizer, got {len(optimizers)}; "
                             "set automatic_optimization = False to drive several")  # fmt: skip
        if self.config.sync_batchnorm:  # (one process: SyncBatchNorm computes as BatchNorm)
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place: the layers are children
        prepared = self.accelerator.prepare(module, *optimizers)
        self._model, self._step_optimizers = prepared[0], list(prepared[1:])
        self._note_trainable()  # a change later (BaseFinetuning) re-wraps the model: _refresh_trainable
        for scheduler in self.lr_scheduler_configs:
            if isinstance(self.strategy, OwnsOptimizerStep):
                self.strategy.check_client_scheduler(scheduler.scheduler)
            self.accelerator.register_for_checkpointing(scheduler.scheduler)
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = [] if module.automatic_optimization else count_manual_steps(self)
        self.state, self.should_stop, self._resumed = LoopState(), False, False
        if checkpoint is not None:
            checkpointing.restore(self, checkpoint)
            self._resumed, self._ckpt_path = True, str(checkpoint)
        self._run(run_fit, "fit")

    def save_checkpoint(self, path: str | os.PathLike[str], weights_only: bool = False) -> Path:
        """Write a pickle-free checkpoint directory at ``path`` (every process must call this).
        ``weights_only``: the model's weights and hyper-parameters alone (loadable, not resumable)."""
        check_bool("weights_only", weights_only, owner="Trainer.save_checkpoint")
        return checkpointing.save(self, path, weights_only)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send a row straight to the loggers (global rank 0 only); for callbacks such as LR monitors."""
        self._metrics.note_logged(metrics)
        self._to_loggers(metrics, self.global_step if step is None else step)

    def _to_loggers(self, row: dict[str, float], step: int) -> None:
        if self.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(dict(row), step)

    # -- internals ----------------------------------------------------------------------------------
    @contextmanager
    def _entering(self, stage: str) -> Iterator[None]:
        """The stage flags (``trainer.training`` ...) and ``trainer.state`` answer for ``stage``
        from its ``setup`` on, as Lightning's; an error before the loop (in ``setup``,
        ``configure_optimizers`` ...) leaves them off and the stage interrupted."""
        self.stage = self._running = stage
        self._interrupted = False
        try:
            yield
        except BaseException:
            self._running, self._interrupted = "", True
            raise

    def _run(self, loop: Any, stage: str) -> Any:
        # SIGTERM / SIGUSR1 end a fit at a step boundary, with a checkpoint. Outermost, so that a signal
        # the fit did not act on is passed on after the loggers were finalized and the teardown hooks ran.
        with self._preemption.during_fit() if stage == "fit" else nullcontext():
            return self._run_stage(loop, stage)

    def _run_stage(self, loop: Any, stage: str) -> Any:
        self.stage = self._running = stage
        self._hook_plan.refresh()  # callbacks' inactive hooks may differ from the last stage's
        if self.world_size > 1 and self.loggers:  # (one small broadcast a stage, on every rank)
            share_versions(self.loggers, self.accelerator.broadcast_object, self.is_global_zero)
        autolog = self.loggers and self.config.enable_autolog_hparams
        hparams = logged_hparams(self.module, self._datamodule) if autolog else None
        for logger in self.loggers if autolog and self.is_global_zero else []:  # (every stage, as Lightning)
            if hparams is not None:
                logger.log_hyperparams(hparams)
            logger.log_graph(self.module)  # (only TensorBoardLogger(log_graph=True) records it)
        status, self._interrupted = "success", False
        try:
            with ExitStack() as stack:
                if self.config.detect_anomaly:
                    stack.enter_context(torch.autograd.detect_anomaly())
                return loop(self)
        except SearchFinished:  # Tuner.lr_find searched at on_fit_start: the fit ends there, as a success
            return None
        except BaseException as exception:
            status = "interrupted" if isinstance(exception, (KeyboardInterrupt, Preempted)) else "failed"
            self._interrupted = True  # (set before on_exception, which may read it)
            call_hook(self, "on_exception", exception, module_hook=False)
            if self._datamodule is not None:  # after the callbacks', as Lightning
                self._datamodule.on_exception(exception)
            raise
        finally:
            if self.is_global_zero:
                for logger in self.loggers:
                    logger.finalize(status)
            if self._datamodule is not None:  # first, as Lightning (and as in setup)
                self._datamodule.teardown(stage)
            call_hook(self, "teardown", stage)
            end_stage(self, stage, failed=status == "failed")  # the profiler's report
            # (also after an exception in the sanity check, which would leave it set)
            self._running, self._evaluation, self.sanity_checking = "", "", False
            self._row_pending = False  # (a batch that raised in on_train_batch_end)

    def _backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:  # (manual_backward)
        self.strategy.prepare_for_manual_backward(self.model, loss)
        backward(self, self._hook_plan.entries(self), loss, *args, **kwargs)

    def _step_schedulers(self, interval: str, metric: bool | None = None) -> None:
        """``metric``: only the schedulers that take a metric (``ReduceLROnPlateau``), or only the
        others; None: both."""
        if not self.lr_scheduler_configs or not self.module.automatic_optimization:
            return  # manual optimisation steps its schedulers itself (self.lr_schedulers())
        count = self.state.global_step if interval == "step" else self.state.epoch + 1
        step = overridden(self.module, "lr_scheduler_step")
        step_schedulers(self.lr_scheduler_configs, interval, count, self.callback_metrics, step, metric)

    def _write_row(self, values: dict[str, torch.Tensor], step: int | None = None) -> None:
        """Send logged values to the loggers (here, and only here, tensors become Python floats).
        ``step``: an evaluation row of step values, at that step and without ``epoch`` (Lightning's)."""
        self._progress_bar_stale = True  # the bar shows values of the same steps as the logs
        self._send_row(values, step)

    def _flush_row(self) -> None:
        """Write the training row due after the running batch, if not written yet. The loop calls it
        after on_train_batch_end, and a checkpoint before it counts the rows written: one saved in
        that hook (``every_n_train_steps``) resumes with the next batch, so it must hold this row."""
        if self._row_pending:
            self._row_pending = False
            self._send_row(self._metrics.step_values)  # (the bar was told before the hook)

    def _send_row(self, values: dict[str, torch.Tensor], step: int | None = None) -> None:
        """:meth:`_write_row`, the progress bar left as it is (told before the row was written)."""
        if not values or self.sanity_checking:
            return
        row = {key: float(value) for key, value in values.items()}
        at = self.state.global_step if step is None else step
        self.metric_history.update(row, at)
        self._to_loggers(row if step is not None else {**row, "epoch": float(self.state.epoch)}, at)
