"""``DataModule``: a project's data in one place (re-exported by ``ember.trainer.module``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.trainer.hparams import HyperparametersMixin
from ember.trainer.module_hooks import BatchTransferHooks

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ember.trainer.trainer import Trainer

__all__ = ["DataModule"]


class DataModule(HyperparametersMixin, BatchTransferHooks):
    """Data in one place: ``prepare_data`` (main process), ``setup(stage)``, and the dataloaders;
    ``save_hyperparameters()`` and ``hparams`` as in a TrainModule.

    Example::

        class Digits(DataModule):
            def setup(self, stage): self.train, self.val = random_split(load(), [0.8, 0.2])
            def train_dataloader(self): return DataLoader(self.train, batch_size=32, shuffle=True)
            def val_dataloader(self): return DataLoader(self.val, batch_size=64)
    """

    #: The Trainer of the stage it was last passed to (None before).
    trainer: Trainer | None = None

    def prepare_data(self) -> None:
        """Download or write files; runs on the main process first, the others wait."""

    def setup(self, stage: str) -> None:
        """Build datasets for ``stage`` ("fit", "validate", "test" or "predict"); runs on every process."""

    def teardown(self, stage: str) -> None:
        """Called at the end of fit/validate/test/predict, on every process."""

    def on_exception(self, exception: BaseException) -> None:
        """The stage's loop raised ``exception`` (``KeyboardInterrupt`` included): called after the
        callbacks' ``on_exception``, before ``teardown``, as Lightning's."""

    def train_dataloader(self) -> DataLoader[Any] | None:
        return None

    def val_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]] | None:
        return None

    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]] | None:
        return None

    def predict_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this DataModule (saved only when not empty); ``{}`` by default."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a fit resumes from a checkpoint that holds it."""
