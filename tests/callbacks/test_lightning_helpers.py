"""The attributes and helper methods of Lightning's built-in callbacks that ported code reads or
calls besides their hooks (the expected values are Lightning 2.6.6's for the same settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from logger_fits import RowLogger
from small_fit import LinearRegression, quiet_trainer, random_loader

from ember import Trainer
from ember.callbacks import EarlyStopping, GradientAccumulationScheduler, LearningRateMonitor, ModelCheckpoint


class Net(LinearRegression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", 1.0 / (self.current_epoch + 1))  # improves every epoch: 1, 0.5, 0.33

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def test_model_checkpoint_helpers(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2)
    with pytest.raises(ValueError, match="pass filepath"):
        ModelCheckpoint().to_yaml()
    trainer = quiet_trainer(tmp_path, [checkpoint], max_epochs=3, enable_checkpointing=True)
    trainer.fit(Net(), random_loader(), random_loader(8))
    # Kept: epochs 1 (0.5) and 2 (0.33); the k-th best is 0.5. Strictly better enters, as Lightning's.
    assert checkpoint.check_monitor_top_k(trainer, torch.tensor(0.4))
    assert not checkpoint.check_monitor_top_k(trainer, torch.tensor(0.5))
    assert not checkpoint.check_monitor_top_k(trainer, None)
    assert checkpoint.file_exists(checkpoint.best_model_path, trainer)
    assert not checkpoint.file_exists(tmp_path / "nothing", trainer)
    checkpoint.to_yaml()
    written = yaml.safe_load((tmp_path / "ckpt" / "best_k_models.yaml").read_text())
    assert written == pytest.approx({path: float(score) for path, score in checkpoint.best_k_models.items()})
    assert len(written) == 2


def test_early_stopping_lr_monitor_and_accumulation_scheduler_attributes(tmp_path: Path) -> None:
    stopper = EarlyStopping(monitor="val_loss", mode="max")
    assert stopper.monitor_op is torch.gt and EarlyStopping(monitor="x").monitor_op is torch.lt
    assert EarlyStopping.mode_dict == {"min": torch.lt, "max": torch.gt}
    assert EarlyStopping.order_dict == {"min": "<", "max": ">"}
    assert GradientAccumulationScheduler({4: 2, 2: 3}).epochs == [0, 2, 4]

    monitor = LearningRateMonitor(log_momentum=True)
    assert monitor.last_momentum_values == {} and monitor.last_weight_decay_values == {}
    trainer = Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=RowLogger(),
                      enable_checkpointing=False, callbacks=[monitor], default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Net(), random_loader())
    assert monitor.last_momentum_values == {"lr-SGD-momentum": 0.9}
    assert monitor.last_weight_decay_values == {"lr-SGD-weight_decay": None}  # (not logged: Lightning's None)
