"""When the Trainer steps an epoch-interval LR scheduler, against Lightning 2.6.6: one that takes no
metric right after the epoch's last optimizer step (so the last batch's ``on_train_batch_end``, the
epoch's validation and ``on_train_epoch_end`` see the new rate), a ``ReduceLROnPlateau`` after the
epoch's end hooks, on what the epoch logged. The expected rates are what Lightning's hooks read for
the same module, data and Trainer arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


class Net(TrainModule):
    def __init__(self, plateau: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.plateau = plateau
        self.seen: list[tuple[str, int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", 1.0)  # never improves: the plateau scheduler halves the rate from epoch 1

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(self.layer.parameters(), lr=0.1)
        if self.plateau:
            scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, patience=0, factor=0.5)
            return {
                "optimizer": sgd,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "val"},
            }
        scheduler = torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.5)
        return {"optimizer": sgd, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _read(self, hook: str) -> None:
        self.seen.append((hook, self.current_epoch, self.trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_epoch_start(self) -> None:
        self._read("train_epoch_start")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 2:  # the epoch's last
            self._read("last_batch_end")

    def on_validation_epoch_end(self) -> None:
        self._read("val_epoch_end")

    def on_train_epoch_end(self) -> None:
        self._read("train_epoch_end")

    def on_train_end(self) -> None:
        self._read("train_end")


def _hooks(epoch: int, start: float, after: float) -> list[tuple[str, int, float]]:
    return [("train_epoch_start", epoch, start), ("last_batch_end", epoch, after),
            ("val_epoch_end", epoch, after), ("train_epoch_end", epoch, after)]  # fmt: skip


# What Lightning 2.6.6's hooks read (recorded with lightning.Trainer, same arguments).
LIGHTNING = {
    "StepLR": [*_hooks(0, 0.1, 0.05), *_hooks(1, 0.05, 0.025), ("train_end", 2, 0.025)],
    "ReduceLROnPlateau": [*_hooks(0, 0.1, 0.1), *_hooks(1, 0.1, 0.1), ("train_end", 2, 0.05)],
}


@pytest.mark.parametrize("plateau", [False, True], ids=["StepLR", "ReduceLROnPlateau"])
def test_epoch_schedulers_step_where_lightning_steps_them(tmp_path: Path, plateau: bool) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g))
    net = Net(plateau)
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(net, DataLoader(data, batch_size=4), DataLoader(data, batch_size=6))
    assert net.seen == LIGHTNING["ReduceLROnPlateau" if plateau else "StepLR"]
