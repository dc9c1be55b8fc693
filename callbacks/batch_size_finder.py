"""``BatchSizeFinder``: find the largest batch size that fits in memory when a run starts (Lightning's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.batch_size_finder import BatchSizeSettings
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["BatchSizeFinder"]


class BatchSizeFinder(Callback):
    """The batch-size search at the start of ``fit`` (or ``validate``, ``test``, ``predict``), as
    Lightning's callback of the same name.

    Trials of ``steps_per_trial`` steps (optimizer steps in ``fit``, batches of the stage's loop
    otherwise) run with the dataloaders rebuilt from the module's or DataModule's
    ``*_dataloader()`` after ``batch_arg_name`` (``module.batch_size``, ``module.hparams.batch_size``
    or the DataModule's) is set to the size tried: from ``init_val``, doubled after each trial that
    ran, until one runs out of memory, ``max_trials`` trials ran, or a batch holds the whole dataset.
    ``mode="power"`` keeps the last size that ran; ``"binsearch"`` bisects between it and the size
    that failed, then takes ``margin`` (a fraction, 5% by default) off the size found, as a safety
    buffer. The size never grows past ``max_val`` (the doubling stops at it). Then everything the trials changed is restored (weights, optimizer, schedulers,
    dataloader positions, RNG, counters), the size found is written into the attribute and the
    run's loaders are rebuilt with it. The result is :attr:`optimal_batch_size`. During the search
    the other callbacks and the loggers are not called.

    Example::

        finder = BatchSizeFinder(mode="binsearch", init_val=16)
        Trainer(max_epochs=10, callbacks=[finder]).fit(module)  # module.train_dataloader() reads module.batch_size
        finder.optimal_batch_size
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 3,
        init_val: int = 2,
        max_trials: int = 25,
        batch_arg_name: str = "batch_size",
        margin: float = 0.05,
        max_val: int = 8192,
    ) -> None:
        from ember.trainer.batch_size_finder import BatchSizeSettings  # (ember.trainer imports the callbacks)

        self._settings: BatchSizeSettings = BatchSizeSettings(
            mode=mode, steps_per_trial=steps_per_trial, init_val=init_val, max_trials=max_trials,
            batch_arg_name=batch_arg_name, margin=margin, max_val=max_val, owner="BatchSizeFinder",
        )  # fmt: skip
        self._ends_run = False  # Tuner.scale_batch_size's: the run ends after the search
        self._found: int | None = None  # the size the last search found (checkpointed)
        self._restored: int | None = None  # the size a resumed fit's checkpoint holds
        #: The batch size found by the last search (Lightning's name); ``init_val`` before one.
        self.optimal_batch_size: int | None = init_val

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._settings.holders(module, trainer.datamodule)  # a missing attribute fails before anything runs

    def scale_batch_size(self, trainer: Trainer, module: TrainModule) -> None:
        """Search now (from the hook that starts the run)."""
        from ember.trainer.batch_size_finder import apply_batch_size, scale_batch_size
        from ember.trainer.state import SearchFinished

        if trainer._resumed and trainer.stage == "fit":
            if (
                self._restored is not None
            ):  # the size the interrupted fit found: its loader positions count in it
                apply_batch_size(trainer, self._settings, self._restored)
                self.optimal_batch_size = self._restored
            return
        found = scale_batch_size(trainer, self._settings)
        if found is not None:
            self.optimal_batch_size = self._found = found
        if self._ends_run:
            raise SearchFinished

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.scale_batch_size(trainer, module)

    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.sanity_checking or trainer.stage != "validate":
            return
        self.scale_batch_size(trainer, module)

    @override
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.scale_batch_size(trainer, module)

    @override
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.scale_batch_size(trainer, module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._found is None else {"optimal_batch_size": self._found}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "optimal_batch_size" in state_dict:
            self._restored = self._found = self.optimal_batch_size = int(state_dict["optimal_batch_size"])
