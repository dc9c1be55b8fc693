"""A float ``val_check_interval`` validates every ``int(batches x fraction)`` batches, and at an
epoch's end only when that count divides the epoch, as Lightning 2.6.6 does (the expected batches
are those after which Lightning's validation ran, same data and arguments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.validated_after: list[tuple[int, int]] = []
        self.last = (0, -1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.last = (self.current_epoch, batch_idx)
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_after.append(self.last)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("interval", "limit", "batches"),
    [(0.3, 1.0, [2, 5, 8]), (0.4, 1.0, [3, 7]), (0.5, 0.7, [2, 5]), (0.25, 1.0, [1, 3, 5, 7, 9])],
)
def test_a_fraction_validates_where_lightning_does(
    tmp_path: Path, interval: float, limit: float, batches: list[int]
) -> None:
    data = TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    net = Net()
    trainer = Trainer(max_epochs=2, val_check_interval=interval, limit_train_batches=limit, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(net, DataLoader(data, batch_size=1), DataLoader(data, batch_size=5))
    assert net.validated_after == [(epoch, i) for epoch in (0, 1) for i in batches]
