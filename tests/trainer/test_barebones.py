"""Trainer(barebones=True), Lightning's switch for measuring the loop itself: every feature that costs
step time is off, a setting that would turn one on is refused, and self.log does nothing."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import regression_loader

from ember import Trainer, TrainModule
from ember.callbacks import Callback, ModelCheckpoint


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.validation_batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_batches += 1
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_barebones_turns_every_costly_feature_off(tmp_path: Path) -> None:
    trainer = Trainer(barebones=True, max_epochs=2, default_root_dir=str(tmp_path))
    assert trainer.loggers == []
    module = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, regression_loader(), regression_loader())
    assert trainer.callbacks == []  # no checkpoint, progress bar, run summary, model summary, guard
    assert trainer.global_step == 8
    assert trainer.callback_metrics == {}  # self.log did nothing ...
    said = [str(w.message) for w in caught if "barebones" in str(w.message)]
    assert said and all("does nothing under Trainer(barebones=True)" in m for m in said)  # ... and said so
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
    assert module.validation_batches == 8  # no sanity check: only the two epoch ends' 4 batches each


def test_a_callback_of_ones_own_still_runs(tmp_path: Path) -> None:
    batches = []

    class Count(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            batches.append(1)

    Trainer(barebones=True, max_epochs=1, callbacks=[Count()], default_root_dir=str(tmp_path)).fit(
        Net(), regression_loader()
    )
    assert len(batches) == 4


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ({"enable_checkpointing": True}, "enable_checkpointing=True"),
        ({"logger": True}, "logger=True"),
        ({"enable_progress_bar": True}, "enable_progress_bar=True"),
        ({"enable_model_summary": True}, "enable_model_summary=True"),
        ({"num_sanity_val_steps": 2}, "num_sanity_val_steps=2"),
        ({"log_every_n_steps": 10}, "log_every_n_steps=10"),
        ({"fast_dev_run": True}, "fast_dev_run=True"),
        ({"detect_anomaly": True}, "detect_anomaly=True"),
        ({"profiler": "simple"}, "profiler='simple'"),
        ({"non_finite": "skip"}, "non_finite='skip'"),
    ],
)
def test_a_setting_that_turns_a_feature_on_is_refused(setting: dict[str, Any], shown: str) -> None:
    with pytest.raises(ValueError, match=rf"Trainer\(barebones=True, {shown}\): barebones turns off"):
        Trainer(barebones=True, **setting)


def test_settings_that_agree_with_barebones_are_accepted(tmp_path: Path) -> None:
    trainer = Trainer(barebones=True, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, max_steps=1,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Net(), regression_loader())
    assert trainer.callbacks == [] and trainer.loggers == []
    with pytest.raises(
        ValueError, match="a ModelCheckpoint callback was given, but enable_checkpointing=False"
    ):
        Trainer(barebones=True, callbacks=[ModelCheckpoint()])
    with pytest.raises(TypeError, match="barebones=1 must be True or False"):
        Trainer(barebones=1)  # type: ignore[arg-type]


def test_unset_switches_keep_their_defaults_without_barebones(tmp_path: Path) -> None:
    # None is Lightning's "the default": a logger (CSV here), checkpointing, progress bar, summary.
    trainer = Trainer(logger=None, enable_checkpointing=None, max_steps=1, default_root_dir=str(tmp_path))
    assert [type(logger).__name__ for logger in trainer.loggers] == ["CSVLogger"]
    trainer.fit(Net(), regression_loader())
    names = {type(c).__name__ for c in trainer.callbacks}
    assert {"ModelCheckpoint", "RichProgressBar", "ModelSummary", "NonFiniteGuard"} <= names
    assert trainer.log_every_n_steps == 50 and trainer.config.num_sanity_val_steps == 2
