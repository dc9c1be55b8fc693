"""``fast_dev_run`` turns off what a real run leaves behind, as Lightning 2.6.6 documents it: the
user's ModelCheckpoint saves nothing, EarlyStopping does not stop the run, and the loggers are
replaced by one that writes nothing, so the code and callbacks that use a logger still run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ember import Trainer, TrainModule
from ember.callbacks import DeviceStatsMonitor, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from tests.small_fit import quiet_trainer, regression_loader


class _Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_given_model_checkpoint_saves_nothing(tmp_path: Path) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_last=True)
    ranked = ModelCheckpoint(dirpath=tmp_path / "ranked", monitor="val_loss", save_top_k=-1, save_last=True)
    trainer = quiet_trainer(tmp_path, [every_step, ranked], fast_dev_run=2, enable_checkpointing=True)
    trainer.fit(_Net(), regression_loader(), regression_loader())
    assert trainer.global_step == 2
    assert not (tmp_path / "steps").exists() and not (tmp_path / "ranked").exists()
    assert (ranked.best_model_path, ranked.last_model_path, every_step.last_model_path) == ("", "", "")
    with pytest.raises(ValueError, match="fast_dev_run"):  # so there is no best one to load
        trainer.validate(ckpt_path="best")


def test_early_stopping_does_not_stop_the_run(tmp_path: Path) -> None:
    # The threshold is met at the first check: a real run stops there.
    stopper = EarlyStopping(monitor="val_loss", stopping_threshold=1e9, check_on_train_epoch_end=False)
    trainer = quiet_trainer(tmp_path, [stopper], fast_dev_run=2, val_check_interval=1)
    trainer.fit(_Net(), regression_loader(), regression_loader())
    assert trainer.global_step == 2 and not trainer.should_stop and stopper.stop_reason == ""
    # Nor does a missing monitor raise: the check is not made (Lightning's short-circuit).
    missing = EarlyStopping(monitor="absent", strict=True)
    quiet_trainer(tmp_path, [missing], fast_dev_run=True).fit(
        _Net(), regression_loader(), regression_loader()
    )


class _UsesItsLogger(_Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.logger.experiment.add_scalar("by hand", 1.0, self.global_step)  # (a TensorBoard call)
        self.logger.log_metrics({"by hand": 1.0}, step=0)
        return super().training_step(batch, batch_idx)


def test_the_loggers_write_nothing_but_are_there(tmp_path: Path) -> None:
    callbacks = [LearningRateMonitor(), DeviceStatsMonitor()]  # (each needs a logger)
    trainer = Trainer(
        default_root_dir=str(tmp_path), fast_dev_run=True, enable_progress_bar=False, callbacks=callbacks
    )
    trainer.fit(_UsesItsLogger(), regression_loader(), regression_loader())
    assert trainer.logger is not None and len(trainer.loggers) == 1 and trainer.logger.version == ""
    assert list(tmp_path.iterdir()) == []  # no log (nor checkpoint) directory
    # As Lightning: with no logger asked for, none.
    assert Trainer(fast_dev_run=True, logger=False).loggers == []


def test_a_checkpoint_saved_in_a_fast_dev_run_resumes_with_real_loggers(tmp_path: Path) -> None:
    quick = Trainer(default_root_dir=str(tmp_path / "quick"), fast_dev_run=True, enable_progress_bar=False)
    module = _Net()
    quick.fit(module, regression_loader())
    quick.save_checkpoint(tmp_path / "ckpt")  # by hand: the logger stand-in has nothing to save
    real = Trainer(default_root_dir=str(tmp_path / "real"), max_steps=2, enable_progress_bar=False,
                   enable_checkpointing=False)  # fmt: skip
    real.fit(module, regression_loader(), ckpt_path=tmp_path / "ckpt")
    assert real.global_step == 2  # (the CSVLogger found no state of its own to continue: a new run)
