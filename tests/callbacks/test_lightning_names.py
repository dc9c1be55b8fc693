"""Lightning's callback base classes and aliases under their names: ``Checkpoint``, ``RichModelSummary``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import regression_loader
from torch import nn

from ember import Trainer, TrainModule
from ember.callbacks import Checkpoint, ModelCheckpoint, ModelSummary, OnExceptionCheckpoint, RichModelSummary


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_is_the_base_of_the_checkpointing_callbacks(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=1,
                      callbacks=[OnExceptionCheckpoint(tmp_path)])  # fmt: skip
    trainer.fit(Net(), regression_loader())
    found = [type(c) for c in trainer.callbacks if isinstance(c, Checkpoint)]
    assert found == [OnExceptionCheckpoint, ModelCheckpoint]


def test_rich_model_summary_replaces_the_default_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = RichModelSummary(max_depth=2)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=1,
                      enable_checkpointing=False, callbacks=[summary])  # fmt: skip
    trainer.fit(Net(), regression_loader())
    assert [c for c in trainer.callbacks if isinstance(c, ModelSummary)] == [summary]
    out = capsys.readouterr().out
    assert out.count("Total params") == 1 and "net.0" in out  # depth 2: the Sequential's layers
    with pytest.raises(ValueError, match=r"ModelSummary\(max_depth=-2\)"):
        RichModelSummary(max_depth=-2)
