"""``LearningRateFinder``: search for a good initial learning rate when the fit starts (Lightning's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.lr_finder import LRFinder, SearchSettings
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["LearningRateFinder"]


class LearningRateFinder(Callback):
    """The learning-rate range test at the start of ``fit``, as Lightning's callback of the same name.

    At ``on_fit_start`` it trains ``num_training_steps`` optimizer steps with the learning rate
    raised at each, from ``min_lr`` to ``max_lr`` (``mode`` ``"exponential"``: geometrically;
    ``"linear"``: evenly), records the smoothed training loss, and stops early once it exceeds
    ``early_stop_threshold`` times the best one (``None``: never). Then everything the steps
    changed is restored (weights, optimizer, schedulers, dataloader positions, RNG, counters), and
    with ``update_attr`` the suggested learning rate is written into ``module.lr`` or
    ``module.learning_rate`` (or ``attr_name``; in ``hparams`` too) and into the optimizer and
    schedulers, as ``configure_optimizers()`` sets them with it. The fit then trains as if it had
    been given that rate. The result is :attr:`optimal_lr`. During the search the other callbacks
    and the loggers are not called, so nothing is logged or checkpointed. A fit resumed from a
    checkpoint does not search again: its learning rate was chosen before it was interrupted.

    Example::

        finder = LearningRateFinder(min_lr=1e-6, max_lr=1.0, num_training_steps=50)
        Trainer(max_epochs=10, callbacks=[finder]).fit(module, loader)
        finder.optimal_lr.suggestion()
    """

    def __init__(
        self,
        min_lr: float = 1e-8,
        max_lr: float = 1.0,
        num_training_steps: int = 100,
        mode: str = "exponential",
        early_stop_threshold: float | None = 4.0,
        update_attr: bool = True,
        attr_name: str = "",
    ) -> None:
        from ember.trainer.lr_finder import SearchSettings  # (ember.trainer imports the callbacks)

        self._settings: SearchSettings = SearchSettings(
            min_lr=min_lr, max_lr=max_lr, num_training=num_training_steps, mode=mode,
            early_stop_threshold=early_stop_threshold, update_attr=update_attr, attr_name=attr_name,
            owner="LearningRateFinder", steps_name="num_training_steps",
        )  # fmt: skip
        self._ends_fit = False  # Tuner.lr_find's: the fit ends after the search
        #: The :class:`~ember.trainer.LRFinder` of the last search (Lightning's name), None before one.
        self.optimal_lr: LRFinder | None = None

    def lr_find(self, trainer: Trainer, module: TrainModule) -> None:
        """Search now (from ``on_fit_start``; a subclass may call it from another hook, such as
        ``on_train_epoch_start``, to search again later in the fit, as in Lightning: once steps were
        taken, the suggestion is set as every parameter group's ``lr``)."""
        from ember.trainer.tuner import SearchFinished, find_lr

        found = find_lr(trainer, module, self._settings, ends_fit=self._ends_fit)
        if found is not None:
            self.optimal_lr = found
        if self._ends_fit:
            raise SearchFinished

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.lr_find(trainer, module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.optimal_lr is None else {"results": dict(self.optimal_lr.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from ember.trainer.lr_finder import LRFinder

        if "results" in state_dict:
            settings = self._settings
            self.optimal_lr = LRFinder(settings.mode, settings.min_lr, settings.max_lr, settings.num_training)
            self.optimal_lr.results = {key: list(values) for key, values in state_dict["results"].items()}
