"""RunSummary: the end-of-fit table of logged metrics, checkpoints and log directories."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import ModelCheckpoint, RunSummary


class _Module(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)), batch_size=4
    )


def test_summary_lists_metric_extremes_checkpoints_and_logs(tmp_path: Path) -> None:
    out = io.StringIO()
    summary = RunSummary(console=Console(file=out, width=200))
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_last=True)
    trainer = Trainer(
        max_epochs=3, log_every_n_steps=2, default_root_dir=str(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[summary, checkpoint],
    )  # fmt: skip
    trainer.fit(_Module(), _loader(), _loader())
    history = trainer.metric_history.metrics
    val = history["val_loss"]
    assert val.min <= val.last <= val.max and val.last_step == trainer.global_step == 24
    assert checkpoint.best_model_score is not None and abs(val.min - checkpoint.best_model_score) < 1e-6
    text = out.getvalue()
    assert "Run summary" in text and "train_loss" in text and "val_loss" in text
    assert f"{val.min:.4g} (step {val.min_step})" in text
    assert (
        f"best checkpoint (val_loss={checkpoint.best_model_score:.4g}, mode=min): {checkpoint.best_model_path}"
        in text
    )
    assert f"last checkpoint: {checkpoint.last_model_path}" in text
    assert f"CSVLogger logs: {trainer.log_dir}" in text


def test_the_trainer_adds_it_with_the_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bar in (True, False):
        trainer = Trainer(
            max_epochs=1,
            default_root_dir=str(tmp_path / str(bar)),
            enable_progress_bar=bar,
            enable_model_summary=False,
            log_every_n_steps=2,  # (rows of step values: the summary's content)
        )
        trainer.fit(_Module(), _loader())
        assert any(isinstance(c, RunSummary) for c in trainer.callbacks) is bar
        assert ("Run summary" in capsys.readouterr().out) is bar
