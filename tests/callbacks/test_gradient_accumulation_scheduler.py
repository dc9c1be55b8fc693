"""``GradientAccumulationScheduler`` under Lightning 2.6.6's method names and warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ember import TrainModule
from ember.callbacks import GradientAccumulationScheduler
from tests.small_fit import quiet_trainer, regression_loader


def test_lightnings_method_names_and_meanings() -> None:
    schedule = GradientAccumulationScheduler({2: 3, 5: 1})
    assert schedule.scheduling == {0: 1, 2: 3, 5: 1}  # as Lightning: the first epochs' 1 made explicit
    assert [schedule.get_accumulate_grad_batches(epoch) for epoch in range(7)] == [1, 1, 3, 3, 3, 1, 1]
    assert schedule.going_to_accumulate_grad_batches() is True  # some epoch accumulates
    assert GradientAccumulationScheduler({0: 1, 3: 1}).going_to_accumulate_grad_batches() is False


class _OwnStep(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        optimizer.step(closure=optimizer_closure)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_warns_that_an_overridden_optimizer_step_runs_once_per_step(tmp_path: Path) -> None:
    scheduler = GradientAccumulationScheduler({0: 2})
    with pytest.warns(UserWarning, match=r"optimizer_\{step,zero_grad\}.*every optimizer step"):
        quiet_trainer(tmp_path, [scheduler], max_epochs=1).fit(_OwnStep(), regression_loader())
    quiet = GradientAccumulationScheduler({0: 1})  # no epoch accumulates: nothing to warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [quiet], max_epochs=1).fit(_OwnStep(), regression_loader())
    assert not [w for w in caught if "optimizer_{step,zero_grad}" in str(w.message)]
