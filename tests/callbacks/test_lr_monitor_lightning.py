"""``LearningRateMonitor`` against Lightning 2.6: the metric names, the batches it logs at and the
steps it logs with, in real fits (the expected rows are what Lightning's callback logged for the
same module, data and Trainer arguments; a per-step row goes in the row of its batch's loss, whose
step counts the batch's optimizer step: Lightning's + 1, docs/how-to/migrate-from-lightning.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from logger_fits import RowLogger
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import BackboneFinetuning, LearningRateMonitor, StochasticWeightAveraging

Optimizers = Callable[["Net"], Any]


class Rows(RowLogger):
    def row(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {k: round(v, 6) for k, v in metrics.items() if k.startswith(("lr-", "my-lr"))}


class Net(TrainModule):
    def __init__(self, optimizers: Optimizers) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)
        self.layer2 = torch.nn.Linear(4, 1)
        self.optimizers_fn = optimizers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return self.optimizers_fn(self)


def _fit(
    tmp_path: Path, optimizers: Optimizers, monitor: LearningRateMonitor, every: int, **kwargs: Any
) -> Rows:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, generator=g), torch.randn(24, 1, generator=g))
    rows = Rows()
    settings = dict(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=rows,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), log_every_n_steps=every)  # fmt: skip
    Trainer(**{**settings, **kwargs}, callbacks=[monitor]).fit(
        Net(optimizers), DataLoader(data, batch_size=4)
    )
    return rows


def _grouped(net: Net) -> Any:
    groups = [{"params": net.layer.parameters()}, {"params": net.layer2.parameters(), "lr": 0.01}]
    return torch.optim.SGD(groups, lr=0.2, momentum=0.9)


def test_names_groups_from_one_and_logs_before_the_batches_that_write_a_row(tmp_path: Path) -> None:
    rows = _fit(tmp_path, _grouped, LearningRateMonitor("step", log_momentum=True), every=2)
    row = {"lr-SGD/pg1": 0.2, "lr-SGD/pg1-momentum": 0.9, "lr-SGD/pg2": 0.01, "lr-SGD/pg2-momentum": 0.9}
    assert rows.rows == [(step, row) for step in (2, 4, 6, 8, 10, 12)]


def test_a_named_group_and_a_named_scheduler_name_the_metrics(tmp_path: Path) -> None:
    def named_group(net: Net) -> Any:
        return torch.optim.SGD([{"params": net.parameters(), "name": "all"}], lr=0.2)

    rows = _fit(tmp_path, named_group, LearningRateMonitor("epoch", log_momentum=True), every=2)
    assert rows.rows == [(step, {"lr-SGD/all": 0.2, "lr-SGD/all-momentum": 0.0}) for step in (0, 6)]

    def named_scheduler(net: Net) -> Any:
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "name": "my-lr", "interval": "step"},
        }

    rows = _fit(tmp_path, named_scheduler, LearningRateMonitor(log_momentum=True), every=3)
    assert rows.rows == [
        (3, {"my-lr": 0.025, "my-lr-momentum": 0.9}),
        (6, {"my-lr": 0.003125, "my-lr-momentum": 0.9}),
        (9, {"my-lr": 0.000391, "my-lr-momentum": 0.9}),
        (12, {"my-lr": 4.9e-05, "my-lr-momentum": 0.9}),
    ]


def test_log_weight_decay_and_the_lrs_history(tmp_path: Path) -> None:
    def adagrad(net: Net) -> Any:
        return torch.optim.Adagrad(net.parameters(), lr=0.1, weight_decay=0.01)

    monitor = LearningRateMonitor("epoch", log_momentum=True, log_weight_decay=True)
    with pytest.warns(RuntimeWarning, match="no momentum"):
        rows = _fit(tmp_path, adagrad, monitor, every=2)
    row = {"lr-Adagrad": 0.1, "lr-Adagrad-momentum": 0.0, "lr-Adagrad-weight_decay": 0.01}
    assert rows.rows == [(0, row), (6, row)]
    assert monitor.lrs == {"lr-Adagrad": [0.1, 0.1]}


def test_several_optimizers_of_a_class_and_repeated_group_names() -> None:
    from ember.callbacks.lr_monitor import _named_optimizers

    class Stub:
        def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
            self.optimizers, self.lr_scheduler_configs = optimizers, []

    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.zeros(2))]

    adams = [torch.optim.Adam(params()), torch.optim.Adam(params()), torch.optim.SGD(params(), lr=0.1)]
    names = [names for _, _, names in _named_optimizers(Stub(adams))]  # type: ignore[arg-type]
    assert names == [["lr-Adam"], ["lr-Adam-1"], ["lr-SGD"]]
    twice = torch.optim.SGD([{"params": params(), "name": "a"}, {"params": params(), "name": "a"}], lr=0.1)
    with pytest.raises(ValueError, match=r"'lr-SGD' repeat the names \['a'\]"):
        _named_optimizers(Stub([twice]))  # type: ignore[arg-type]


def test_swa_keeps_the_optimizers_name(tmp_path: Path) -> None:
    def sgd(net: Net) -> Any:
        return torch.optim.SGD(net.parameters(), lr=0.2)

    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)
    rows = Rows()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    trainer = Trainer(max_epochs=3, enable_progress_bar=False, enable_model_summary=False, logger=rows,
                      enable_checkpointing=False, default_root_dir=str(tmp_path),
                      callbacks=[swa, LearningRateMonitor("epoch")])  # fmt: skip
    trainer.fit(Net(sgd), DataLoader(data, batch_size=4))
    # As Lightning's: the SWALR that replaces the schedule has no name of its own.
    assert [list(row) for _, row in rows.rows] == [["lr-SGD"]] * 3


def test_lrs_history_follows_a_group_added_during_the_fit(tmp_path: Path) -> None:
    class Backbone(Net):
        def __init__(self) -> None:
            super().__init__(lambda net: torch.optim.SGD(net.layer2.parameters(), lr=0.1))
            self.backbone = self.layer

    monitor = LearningRateMonitor("epoch")
    rows = Rows()
    trainer = Trainer(max_epochs=3, enable_progress_bar=False, enable_model_summary=False, logger=rows,
                      enable_checkpointing=False, default_root_dir=str(tmp_path),
                      callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), monitor])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    trainer.fit(Backbone(), DataLoader(data, batch_size=4))
    # As Lightning's: the first group's history moves to "/pg1" once a second group appears.
    assert monitor.lrs == {"lr-SGD/pg1": [0.1, 0.1, 0.1], "lr-SGD/pg2": pytest.approx([0.01, 0.02])}
