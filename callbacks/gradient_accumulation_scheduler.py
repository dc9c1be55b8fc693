"""``GradientAccumulationScheduler``: a number of batches per optimizer step that changes with the epoch."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from typing_extensions import override

from ember.callbacks.base import Callback
from ember.trainer.hooks import overridden

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["GradientAccumulationScheduler"]


class GradientAccumulationScheduler(Callback):
    """Accumulate ``scheduling[e]`` batches per optimizer step from epoch ``e`` on (epochs count
    from 0; before the first key, 1), as Lightning's does. After the fit,
    ``trainer.accumulate_grad_batches`` keeps the last epoch's value (it is not reset); a later fit
    of the same Trainer follows the schedule again.

    Example::

        GradientAccumulationScheduler(scheduling={0: 8, 4: 4, 8: 1})  # 8 batches per step, then 4, then 1
    """

    def __init__(self, scheduling: dict[int, int]) -> None:
        if not isinstance(scheduling, dict) or not scheduling:
            raise TypeError(
                f"GradientAccumulationScheduler(scheduling={scheduling!r}) must be a non-empty dict "
                "{epoch: batches per step}"
            )
        for epoch, batches in scheduling.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"GradientAccumulationScheduler: epoch {epoch!r} must be an int >= 0")
            if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
                raise ValueError(
                    f"GradientAccumulationScheduler: {batches!r} batches per step (epoch {epoch}) must be an int >= 1"
                )
        # As Lightning's: the epochs before the first key accumulate 1 batch, written out.
        self.scheduling = dict(sorted({0: 1, **scheduling}.items()))
        self.epochs = list(self.scheduling)  # the epochs where the accumulation changes (Lightning's)
        self._applied: tuple[int, int] | None = None  # (id of the Trainer, the batches it was set to)

    def going_to_accumulate_grad_batches(self) -> bool:
        """Whether some epoch of the schedule accumulates more than 1 batch per step."""
        return any(batches > 1 for batches in self.scheduling.values())

    def get_accumulate_grad_batches(self, epoch: int) -> int:
        """The batches per step of ``epoch``."""
        batches = 1
        for start, value in self.scheduling.items():
            if epoch >= start:
                batches = value
        return batches

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        batches = trainer.config.accumulate_grad_batches
        # The value this callback left after an earlier fit of the same Trainer is no conflict.
        if batches != 1 and self._applied != (id(trainer), batches):
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.config.accumulate_grad_batches}) and a "
                "GradientAccumulationScheduler both set the batches per step: keep one"
            )
        if not module.automatic_optimization:
            raise ValueError("GradientAccumulationScheduler needs automatic optimization")
        hooks = [name for name in ("optimizer_step", "optimizer_zero_grad") if overridden(module, name)]
        if hooks and self.going_to_accumulate_grad_batches():
            warnings.warn(
                f"{type(module).__name__} overrides {' and '.join(hooks)} and GradientAccumulationScheduler "
                "accumulates batches: TrainModule.optimizer_{step,zero_grad} run once every optimizer step, "
                "not every batch",
                stacklevel=2,
            )

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._apply(trainer)  # (a fit resumed in the middle of an epoch starts no epoch)

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._apply(trainer)

    def _apply(self, trainer: Trainer) -> None:
        # As Lightning's, nothing puts it back after the fit: it reads the last epoch's value then.
        trainer.accumulate_grad_batches = self.get_accumulate_grad_batches(trainer.current_epoch)
        self._applied = (id(trainer), trainer.accumulate_grad_batches)
