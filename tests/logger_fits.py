"""A small fit whose logged rows the logger tests compare (tests/trainer/test_loggers.py, test_mlflow_logger.py),
and ``RowLogger``, a logger that keeps its rows in memory."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback
from ember.trainer.loggers import Logger


def csv_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RowLogger(Logger):
    """Keeps ``(step, row)`` for each row it gets; ``row`` picks what a test compares (an empty row
    is not kept)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return "rows"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass

    def row(self, metrics: dict[str, float]) -> dict[str, Any]:
        return dict(metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = self.row(metrics)
        if row:
            self.rows.append((step, row))


# -- a small fit --------------------------------------------------------------------------------------
def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


class Regressor(TrainModule):
    def __init__(self, lr: float = 0.1, layer: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def fit(root: Path, logger: Any, epochs: int = 2, callbacks: list[Callback] | None = None,
        ckpt_path: str | Path | None = None) -> Trainer:  # fmt: skip
    """4 steps per epoch, a row every step, validation (and a checkpoint) after each epoch."""
    torch.manual_seed(0)
    trainer = Trainer(
        max_epochs=epochs, logger=logger, callbacks=callbacks, log_every_n_steps=1, default_root_dir=str(root),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    module = Regressor(lr=0.1, layer={"width": 3, "kind": "linear"})
    trainer.fit(
        module, DataLoader(_data(), batch_size=4), DataLoader(_data(8), batch_size=4), ckpt_path=ckpt_path
    )
    return trainer
