"""``Timer`` against Lightning 2.6's: a resumed fit whose budget is already spent trains nothing,
and ``verbose`` controls the stop message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import TrainModule
from ember.callbacks import Timer


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_a_budget_spent_before_the_fit_trains_nothing(tmp_path: Path, interval: str) -> None:
    # What a resumed fit restores from a checkpoint saved once the budget ran out.
    timer = Timer(duration={"seconds": 60}, interval=interval)
    timer.load_state_dict({"time_elapsed": {"train": 61.0}})
    trainer = quiet_trainer(tmp_path, [timer], max_epochs=3)
    trainer.fit(Net(), regression_loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_controls_the_stop_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verbose: bool
) -> None:
    timer = Timer(duration={"seconds": 0}, interval="step", verbose=verbose)
    quiet_trainer(tmp_path, [timer], max_epochs=1).fit(Net(), regression_loader())
    assert ("time limit" in capsys.readouterr().out) is verbose
    with pytest.raises(TypeError, match=r"Timer\(verbose=1\)"):
        Timer(verbose=1)  # type: ignore[arg-type]
