"""The callback interface. Every hook does nothing by default; override the ones you need.

Hooks receive the :class:`~ember.trainer.Trainer` and the :class:`~ember.trainer.TrainModule`.
The order in which the Trainer calls them (interleaved with the module's own hooks) is written
down once, in ``docs/concepts/hooks.md``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["Callback", "Checkpoint", "acts_after_validation", "acts_at_train_epoch_end"]


def acts_at_train_epoch_end(trainer: Trainer, choice: bool | None) -> bool:
    """Whether a monitoring callback (``ModelCheckpoint``, ``EarlyStopping``) acts at the end of the
    training epoch rather than at the end of each validation run: ``choice`` when given; else when
    no validation batch runs in the fit, or when validation runs once per epoch, at its end
    (``val_check_interval=1.0``, ``check_val_every_n_epoch=1``). Then it sees the epoch's training
    values, what the module logged in ``on_train_epoch_end`` and the validation's values (Lightning's rule)."""
    if choice is not None:
        return choice
    if not any(trainer.num_val_batches):
        return True
    interval = trainer.val_check_interval
    return trainer.check_val_every_n_epoch == 1 and isinstance(interval, float) and interval == 1.0


def acts_after_validation(trainer: Trainer, choice: bool | None) -> bool:
    """Whether a monitoring callback acts at this ``on_validation_end``: a validation run of ``fit``
    (not the sanity check) when it does not act at the training epoch's end instead."""
    return (
        trainer.stage == "fit"
        and not trainer.sanity_checking
        and not acts_at_train_epoch_end(trainer, choice)
    )


class Callback:
    """Base class for Trainer callbacks.

    Example::

        class PrintLoss(Callback):
            def on_train_epoch_end(self, trainer, module):
                print(trainer.current_epoch, trainer.callback_metrics.get("loss"))
    """

    #: Monitoring callbacks (checkpointing, early stopping) run *after* the module's hook, so they
    #: see everything the module logged in it. Others run before the module's hook.
    monitoring: ClassVar[bool] = False
    #: A progress bar: the Trainer adds its default bar only when no callback is one, and a module's
    #: bar (``configure_callbacks``) replaces the Trainer's.
    progress_bar: ClassVar[bool] = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (unique among the Trainer's callbacks)."""
        return type(self).__qualname__

    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        """Hooks this callback defines but that do nothing with its present settings: the Trainer
        does not call them. Asked at the start of each stage and training epoch, so a per-batch hook
        that would only return costs nothing. Default: none."""
        return frozenset()

    # -- set-up and tear-down --------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        """Called at the start of fit/validate/test/predict (``stage``), on every rank."""

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        """Called at the end of fit/validate/test/predict, on every rank."""

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_sanity_check_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_sanity_check_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None: ...

    # -- training -------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None: ...
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...
    def on_before_backward(self, trainer: Trainer, module: TrainModule, loss: torch.Tensor) -> None: ...
    def on_after_backward(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None: ...
    def on_before_zero_grad(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None: ...

    # -- evaluation (validation, test) and prediction -------------------------------------------
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]
    ) -> None: ...
    def on_load_checkpoint(
        self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]
    ) -> None: ...

    def checkpoint_weights(self, trainer: Trainer, module: TrainModule) -> AbstractContextManager[None]:
        """A context the Trainer saves a checkpoint in: the module holds, inside it, the weights the
        checkpoint stores as the model's (``WeightAveraging``: the average). Ember's checkpoints keep
        the weights out of the ``on_save_checkpoint`` dictionary, so a callback that would replace
        ``checkpoint["state_dict"]`` in Lightning swaps the module's weights here. Default: as they are."""
        return nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints (JSON-able values and tensors). Empty: nothing is saved."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Checkpoint(Callback):
    """The base of the callbacks that save checkpoints (``ModelCheckpoint``, ``OnExceptionCheckpoint``),
    as Lightning's: ``isinstance(callback, Checkpoint)`` finds them. It adds nothing else."""
