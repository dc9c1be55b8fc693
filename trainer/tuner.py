"""``Tuner``: Lightning's learning-rate finder, and the Trainer's methods that run the search.

A search trains ``num_training`` optimizer steps with the learning rate raised at each step, from
``min_lr`` to ``max_lr``, records the smoothed loss after each, and then puts the fit back exactly as
it was: weights, optimizer, LR schedulers, grad scaler, dataloader positions, RNG streams, loop
counters, logged values and callbacks. It runs at ``on_fit_start`` (the ``LearningRateFinder``
callback; ``Tuner.lr_find`` runs a fit that ends there), so everything it needs is prepared.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from ember._rng import rng_state, set_rng_state
from ember.strategies.base import OwnsOptimizerStep
from ember.trainer.hooks import call_hook, overridden
from ember.trainer.logging import MetricHistory, MetricStore
from ember.trainer.lr_finder import LRFinder, SearchRecorder, SearchSettings, lr_holders, set_lr
from ember.trainer.optim import parse_optimizers
from ember.trainer.state import LoopState

if TYPE_CHECKING:
    from ember.callbacks.lr_finder import LearningRateFinder
    from ember.trainer.module import DataModule, TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["LRSearch", "SearchFinished", "Tuner", "find_lr"]

_STATE_NAME = "lr_find_metrics"  # the logged values' state, saved with the weights before the search
_NO_SIGNAL = SimpleNamespace(received=None)  # pre-emption is not acted on inside a search


class SearchFinished(Exception):
    """Raised by the ``LearningRateFinder`` of ``Tuner.lr_find`` once it searched: the fit ends there."""


class Tuner:
    """Tune a module's hyper-parameters with a Trainer, as Lightning's ``Tuner``: :meth:`lr_find`.

    Example::

        trainer = Trainer(max_epochs=10)
        finder = Tuner(trainer).lr_find(module, train_loader)  # module.lr is now the suggestion
        trainer.fit(module, train_loader)
    """

    def __init__(self, trainer: Trainer) -> None:
        from ember.trainer.trainer import Trainer  # (this module is imported by the Trainer's)

        if not isinstance(trainer, Trainer):
            raise TypeError(f"Tuner(trainer) needs an ember Trainer, got {type(trainer).__name__}")
        self._trainer = trainer

    def lr_find(
        self,
        module: TrainModule | None = None,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: DataModule | None = None,
        min_lr: float = 1e-8,
        max_lr: float = 1.0,
        num_training: int = 100,
        mode: str = "exponential",
        early_stop_threshold: float | None = 4.0,
        update_attr: bool = True,
        attr_name: str = "",
        *,
        model: TrainModule | None = None,
    ) -> LRFinder | None:
        """Search for a good initial learning rate, then leave the module as it was but for the rate.

        Runs ``trainer.fit`` up to ``on_fit_start`` (setup, ``configure_optimizers``, preparation),
        trains ``num_training`` optimizer steps with the learning rate going from ``min_lr`` to
        ``max_lr`` (``mode`` ``"exponential"`` or ``"linear"``), stopping early once the smoothed
        loss exceeds ``early_stop_threshold`` times the best one (``None``: never), and restores
        everything. Nothing is logged and no checkpoint is written. ``update_attr``: the
        :meth:`~LRFinder.suggestion` is written into ``module.lr`` or ``module.learning_rate`` (or
        ``attr_name``; in the module's ``hparams`` too), for the next ``fit``'s
        ``configure_optimizers`` to read. Returns the :class:`LRFinder`, or None with
        ``fast_dev_run`` (no search). Bad arguments raise ``ValueError`` before any step.
        """
        from ember.callbacks.lr_finder import LearningRateFinder  # (ember.callbacks imports the Trainer)

        settings = SearchSettings(min_lr=min_lr, max_lr=max_lr, num_training=num_training, mode=mode,
                                  early_stop_threshold=early_stop_threshold, update_attr=update_attr,
                                  attr_name=attr_name)  # fmt: skip
        finder = LearningRateFinder(
            min_lr, max_lr, num_training, mode, early_stop_threshold, update_attr, attr_name
        )
        finder._settings = settings  # (its errors name lr_find)
        finder._ends_fit = True
        self._trainer._fit_for_lr_find(finder, module, train_dataloaders, val_dataloaders, datamodule, model)
        return finder.optimal_lr


def find_lr(
    trainer: Trainer, module: TrainModule, settings: SearchSettings, ends_fit: bool
) -> LRFinder | None:
    """What ``LearningRateFinder`` does at ``on_fit_start``: search, restore, then (``update_attr``)
    write the suggestion into the module's attribute and, when the fit goes on (``ends_fit`` False),
    into its optimizer and schedulers. None: no search (``fast_dev_run``, or a resumed fit)."""
    if trainer.config.fast_dev_run:
        warnings.warn("fast_dev_run is set: the learning-rate finder does not search", stacklevel=3)
        return None
    if trainer._resumed and not ends_fit:
        return None  # this run chose its learning rate before it was interrupted
    name, holders = (
        lr_holders(module, trainer.datamodule, settings.attr_name, settings.owner)
        if settings.update_attr
        else ("", [])
    )
    finder = trainer._lr_range_test(settings)
    if not settings.update_attr:
        return finder
    lr = finder.suggestion()
    if lr is None:
        return finder
    set_lr(holders, name, lr)
    if not ends_fit:
        trainer._configure_learning_rate(lr)
    if trainer.is_global_zero:
        print(
            f"ember: learning rate set to {lr:.4g} ({type(module).__name__}.{name})",
            file=sys.stderr,
            flush=True,
        )
    return finder


class LRSearch:
    """Mixed into :class:`~ember.trainer.Trainer`: the learning-rate search, which swaps the
    Trainer's callbacks, loggers, schedulers, counters and logged values for its own while it runs."""

    def _fit_for_lr_find(self, finder: LearningRateFinder, module: TrainModule | None, train: Any, val: Any,
                         datamodule: DataModule | None, model: TrainModule | None) -> None:  # fmt: skip
        """``Tuner.lr_find``: a fit that ``finder`` ends at ``on_fit_start``, with no logger, and that
        leaves the RNG streams as they were (what the next fit draws is what it would have drawn)."""
        trainer = cast("Trainer", self)
        from ember.callbacks.lr_finder import LearningRateFinder

        if any(isinstance(c, LearningRateFinder) for c in trainer._callbacks):
            raise ValueError(
                "this Trainer has a LearningRateFinder callback already: remove it to use the Tuner"
            )
        callbacks, loggers = trainer._callbacks, trainer.loggers
        # First: it ends the fit before the others' on_fit_start (ModelSummary would print).
        trainer._callbacks, trainer.loggers = [finder, *callbacks], []
        state = rng_state(xla=trainer.strategy.accelerator == "xla")
        try:
            trainer.fit(module, train, val, datamodule, model=model)
        finally:
            trainer._callbacks, trainer.loggers = callbacks, loggers
            set_rng_state(state)

    def _lr_range_test(self, settings: SearchSettings) -> LRFinder:
        """Train with the search's learning rates, then restore everything the steps changed."""
        trainer = cast("Trainer", self)
        module = trainer.module
        owner = settings.owner
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"{owner} works with one optimizer, and configure_optimizers() returned {len(trainer.optimizers)}"
            )
        if isinstance(trainer.strategy, OwnsOptimizerStep):
            raise ValueError(
                f"{owner} sets the learning rate of each step, and under strategy={trainer.strategy.strategy_name!r} "
                "the engine owns the step and its schedule: search with DDP or a single device"
            )
        directory, created = _scratch_directory(trainer)
        # Weights, optimizer, schedulers, scaler, loader positions and RNG, through the strategy (any
        # layout); the torchmetrics states the module's steps update come with the logged values.
        trainer.accelerator.save_state(
            directory, rank_extra={_STATE_NAME: trainer._metrics.state_dict(module)}
        )
        saved = (trainer.callbacks, trainer.loggers, trainer.lr_scheduler_configs, trainer.state, trainer._metrics,
                 trainer.metric_history, trainer.logged_metrics, trainer.should_stop, trainer._progress_bar_values,
                 trainer._progress_bar_stale)  # fmt: skip
        recorder = SearchRecorder(settings)
        try:
            trainer.callbacks, trainer.loggers = [recorder], []
            if module.automatic_optimization:  # (in manual mode the module steps its own: leave them)
                trainer.lr_scheduler_configs = []
            trainer.state = LoopState(**trainer.state.state_dict())
            trainer._metrics = MetricStore(lambda tensor, op: trainer.accelerator.reduce(tensor, op))  # type: ignore[arg-type]
            trainer.metric_history, trainer.logged_metrics, trainer.should_stop = MetricHistory(), {}, False
            trainer._hook_plan.refresh()
            self._search_batches(recorder)
        finally:
            (trainer.callbacks, trainer.loggers, trainer.lr_scheduler_configs, trainer.state, trainer._metrics,
             trainer.metric_history, trainer.logged_metrics, trainer.should_stop, trainer._progress_bar_values,
             trainer._progress_bar_stale) = saved  # fmt: skip
            trainer._hook_plan.refresh()
            try:
                extra = trainer.accelerator.load_state(directory)
                trainer._metrics.load_state_dict(extra[_STATE_NAME], module)
            finally:
                trainer.accelerator.wait_for_everyone()  # every process read it before it goes
                if trainer.is_global_zero:
                    _remove(directory, created)
        result = LRFinder(settings.mode, settings.min_lr, settings.max_lr, settings.num_training)
        result.results = {"lr": list(recorder.lrs), "loss": list(recorder.losses)}
        return result

    def _search_batches(self, recorder: SearchRecorder) -> None:
        """The training loop of a search: epochs of training batches (with the module's epoch hooks,
        no validation, no pre-emption stop) until ``recorder.stop``."""
        from ember.trainer.loops import _end_epoch, _train_batch  # (the loops import the step code)
        from ember.trainer.step import Epoch

        trainer = cast("Trainer", self)
        state, loader = trainer.state, trainer._train_loader
        assert loader is not None
        while not recorder.stop:
            steps_before = state.global_step
            if state.batch_idx == 0:
                loader.set_epoch(state.epoch)
                trainer._metrics.reset()
                call_hook(trainer, "on_train_epoch_start")
            trainer._hook_plan.refresh()
            epoch = dataclasses.replace(Epoch.of(trainer, validates=False), several=False, signals=_NO_SIGNAL)
            if epoch.automatic and epoch.accumulate == 1:
                trainer.accelerator.accumulate(epoch.model, sync=True)
            batches = iter(loader)
            try:
                left = max(0, int(epoch.limit) - state.batch_idx) if epoch.sized else None
                for batch in itertools.islice(batches, left):
                    if _train_batch(trainer, epoch, batch) or recorder.stop:
                        break
            finally:
                batches.close()  # type: ignore[attr-defined]
            if recorder.stop:
                break
            _end_epoch(trainer)
            state.next_epoch()
            if state.global_step == steps_before:  # (no data, or every training_step returned None)
                warnings.warn(
                    f"the learning-rate search stopped after {len(recorder.lrs)} of {recorder.settings.num_training} "
                    "steps: an epoch of the training data took no optimizer step",
                    stacklevel=4,
                )
                break

    def _configure_learning_rate(self, lr: float) -> None:
        """The fit goes on after a search that changed the module's learning rate: before its first
        step, its optimizer and schedulers take the settings ``configure_optimizers()`` gives now
        (called once more, its parameter groups and schedulers' states copied into the fit's). Later
        in the fit, or where what it returns has another shape, every parameter group's ``"lr"`` is
        set to ``lr`` (Lightning's rule)."""
        trainer = cast("Trainer", self)
        module, optimizer, configs = trainer.module, trainer.optimizers[0], trainer.lr_scheduler_configs
        if trainer.global_step > 0:  # a later search (a subclass's): the schedulers keep their place
            for group in optimizer.param_groups:
                group["lr"] = lr
            return
        custom_step = overridden(module, "lr_scheduler_step") is not None
        fresh, fresh_configs = parse_optimizers(module.configure_optimizers(), custom_step=custom_step)
        if (
            len(fresh) == 1
            and type(fresh[0]) is type(optimizer)
            and len(fresh[0].param_groups) == len(optimizer.param_groups)
            and [type(c.scheduler) for c in fresh_configs] == [type(c.scheduler) for c in configs]
        ):
            for group, new in zip(optimizer.param_groups, fresh[0].param_groups, strict=True):
                group.update({key: value for key, value in new.items() if key != "params"})
            for config, new_config in zip(configs, fresh_configs, strict=True):
                config.scheduler.load_state_dict(new_config.scheduler.state_dict())
            return
        warnings.warn(
            "configure_optimizers() returned another optimizer or schedulers after the learning-rate search: "
            f"every parameter group's lr is set to {lr:.4g}, and the schedulers keep their state",
            stacklevel=4,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr


def _scratch_directory(trainer: Trainer) -> tuple[Path, Path | None]:
    """Where the state before the search is kept: a hidden directory of ``default_root_dir`` (a
    place every process can read, also across nodes), named by rank 0; and the first directory the
    save creates on the way there (removed after), None if ``default_root_dir`` exists."""
    name = f".lr_find-{uuid.uuid4().hex}"
    if trainer.world_size > 1:
        name = trainer.accelerator.broadcast_object(name)
    root = Path(trainer.default_root_dir).absolute()
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    if trainer.is_global_zero:
        root.mkdir(parents=True, exist_ok=True)
    return root / name, created


def _remove(directory: Path, created: Path | None) -> None:
    """Delete the search's state, and the folders made for it when nothing else went there since."""
    shutil.rmtree(directory, ignore_errors=True)
    if created is None:
        return
    folder = directory.parent
    while True:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        if folder == created:
            return
        folder = folder.parent
