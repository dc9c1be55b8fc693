"""``Tuner``: Lightning's learning-rate finder, and the functions that run the search on a Trainer.

A search trains ``num_training`` optimizer steps with the learning rate raised at each step, from
``min_lr`` to ``max_lr``, records the smoothed loss after each, and then puts the fit back exactly as
it was: weights, optimizer, LR schedulers, grad scaler, dataloader positions, RNG streams, loop
counters, logged values and callbacks. It runs at ``on_fit_start`` (the ``LearningRateFinder``
callback; ``Tuner.lr_find`` runs a fit that ends there), so everything it needs is prepared.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember._rng import rng_state, set_rng_state
from ember.strategies.capabilities import OwnsOptimizerStep
from ember.trainer.data import entry_arguments
from ember.trainer.hooks import overridden
from ember.trainer.lr_finder import LRFinder, SearchRecorder, SearchSettings, lr_holders, set_lr
from ember.trainer.optim import parse_optimizers
from ember.trainer.search_state import preserved, search_batches
from ember.trainer.state import SearchFinished

if TYPE_CHECKING:
    from ember.callbacks.base import Callback
    from ember.trainer.module import DataModule, TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["SearchFinished", "Tuner", "find_lr"]


class Tuner:
    """Tune a module's hyper-parameters with a Trainer, as Lightning's ``Tuner``: :meth:`lr_find`
    and :meth:`scale_batch_size`.

    Example::

        trainer = Trainer(max_epochs=10)
        finder = Tuner(trainer).lr_find(module, train_loader)  # module.lr is now the suggestion
        trainer.fit(module, train_loader)
        size = Tuner(trainer).scale_batch_size(module)  # module.batch_size, read by train_dataloader()
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
        trainer = self._trainer
        _run_with_finder(
            trainer,
            finder,
            lambda: trainer.fit(module, train_dataloaders, val_dataloaders, datamodule, model=model),
        )
        return finder.optimal_lr

    def scale_batch_size(
        self,
        model: TrainModule | None = None,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        dataloaders: Any = None,
        datamodule: DataModule | None = None,
        method: str = "fit",
        mode: str = "power",
        steps_per_trial: int = 3,
        init_val: int = 2,
        max_trials: int = 25,
        batch_arg_name: str = "batch_size",
        margin: float = 0.05,
        max_val: int = 8192,
        *,
        module: TrainModule | None = None,
    ) -> int | None:
        """Find the largest batch size that fits in memory, write it into the module's (or the
        DataModule's) ``batch_arg_name`` attribute, and leave everything else as it was.

        Runs ``trainer.<method>`` (``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``) up to its
        start, then trials of ``steps_per_trial`` steps with the dataloaders rebuilt from the
        module's or DataModule's ``*_dataloader()`` at each size: ``init_val``, doubled after each
        trial that ran (never past ``max_val``), until one runs out of memory, ``max_trials`` ran,
        ``max_val`` ran, or a batch holds the whole dataset; ``mode="power"`` keeps the last size that
        ran, ``"binsearch"`` bisects between it and the size that failed and takes ``margin`` (a
        fraction) off the size found, as Lightning. Returns the size (None with ``fast_dev_run``: no search). Bad
        arguments, and dataloaders passed directly (they cannot be resized), raise ``ValueError``
        before anything runs. See docs/how-to/find-a-batch-size.md.
        """
        from ember.callbacks.batch_size_finder import BatchSizeFinder
        from ember.trainer.batch_size_finder import BatchSizeSettings, check_tuner_call

        settings = BatchSizeSettings(mode=mode, steps_per_trial=steps_per_trial, init_val=init_val,
                                     max_trials=max_trials, batch_arg_name=batch_arg_name, margin=margin,
                                     max_val=max_val)  # fmt: skip
        loaders = train_dataloaders if method == "fit" else dataloaders
        module, loaders, datamodule = entry_arguments(method, module, model, loaders, datamodule)
        check_tuner_call(method, loaders if method == "fit" else train_dataloaders, val_dataloaders,
                         loaders if method != "fit" else dataloaders)  # fmt: skip
        if module is None:
            raise TypeError("scale_batch_size() needs a module: Tuner(trainer).scale_batch_size(module, ...)")
        settings.holders(module, datamodule)
        finder = BatchSizeFinder(mode, steps_per_trial, init_val, max_trials, batch_arg_name, margin, max_val)
        finder._settings = settings  # (its errors name scale_batch_size)
        finder._ends_run = True
        trainer, was_training = self._trainer, module.training
        runs = {
            "fit": lambda: trainer.fit(module, None, val_dataloaders, datamodule),
            "validate": lambda: trainer.validate(module, None, datamodule=datamodule, verbose=False),
            "test": lambda: trainer.test(module, None, datamodule=datamodule, verbose=False),
            "predict": lambda: trainer.predict(module, None, datamodule=datamodule, return_predictions=False),
        }
        try:
            _run_with_finder(trainer, finder, runs[method])
        finally:
            module.train(was_training)  # (an evaluation stage ended at its start, in eval mode)
        return finder._found


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
    finder = _lr_range_test(trainer, settings)
    if not settings.update_attr:
        return finder
    lr = finder.suggestion()
    if lr is None:
        return finder
    set_lr(holders, name, lr)
    if not ends_fit:
        _configure_learning_rate(trainer, lr)
    if trainer.is_global_zero:
        print(
            f"ember: learning rate set to {lr:.4g} ({type(module).__name__}.{name})",
            file=sys.stderr,
            flush=True,
        )
    return finder


def _run_with_finder(trainer: Trainer, finder: Callback, run: Callable[[], Any]) -> None:
    """A Tuner's run: ``run()`` (a fit, validate, ...) with ``finder`` first among the callbacks,
    which ends it once it searched; with no logger, and leaving the RNG streams as they were (what
    the next fit draws is what it would have drawn)."""
    if any(isinstance(c, type(finder)) for c in trainer._callbacks):
        raise ValueError(
            f"this Trainer has a {type(finder).__name__} callback already: remove it to use the Tuner"
        )
    # (``callbacks``: the last stage's, with its module's; the run sets them with the finder.)
    given, callbacks, loggers = trainer._callbacks, trainer.callbacks, trainer.loggers
    # First: it ends the run before the others' hooks (ModelSummary would print).
    trainer._callbacks, trainer.loggers = [finder, *given], []
    state = rng_state(xla=trainer.strategy.accelerator == "xla")
    try:
        run()
    finally:
        trainer._callbacks, trainer.callbacks, trainer.loggers = given, callbacks, loggers
        set_rng_state(state)


def _lr_range_test(trainer: Trainer, settings: SearchSettings) -> LRFinder:
    """Train with the search's learning rates, then restore everything the steps changed."""
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
    recorder = SearchRecorder(settings)
    with preserved(trainer, [recorder], "lr_find"):
        if module.automatic_optimization:  # (in manual mode the module steps its own: leave them)
            trainer.lr_scheduler_configs = []
        _search_batches(trainer, recorder)
    result = LRFinder(settings.mode, settings.min_lr, settings.max_lr, settings.num_training)
    result.results = {"lr": list(recorder.lrs), "loss": list(recorder.losses)}
    return result


def _search_batches(trainer: Trainer, recorder: SearchRecorder) -> None:
    """Training batches of the search (:func:`~ember.trainer.search_state.search_batches`) until
    ``recorder.stop``."""
    for _ in search_batches(trainer):
        if recorder.stop:
            return
    warnings.warn(  # the batches ended by themselves: an epoch without an optimizer step
        f"the learning-rate search stopped after {len(recorder.lrs)} of {recorder.settings.num_training} "
        "steps: an epoch of the training data took no optimizer step",
        stacklevel=4,
    )


def _configure_learning_rate(trainer: Trainer, lr: float) -> None:
    """The fit goes on after a search that changed the module's learning rate: before its first
    step, its optimizer and schedulers take the settings ``configure_optimizers()`` gives now
    (called once more, its parameter groups and schedulers' states copied into the fit's). Later
    in the fit, or where what it returns has another shape, every parameter group's ``"lr"`` is
    set to ``lr`` (Lightning's rule)."""
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
