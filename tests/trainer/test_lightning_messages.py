"""What the Trainer says and sets where Lightning 2.6 does: the default of an unset ``max_epochs``,
a stop request that ``min_epochs``/``min_steps`` defer, a progress bar given with
``enable_progress_bar=False``, an explicit ``deterministic=False``, and
``estimated_stepping_batches`` with ``max_epochs=0``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader as _loader

from ember import Trainer, TrainModule
from ember.callbacks import Callback, RichProgressBar, Timer


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.sized: list[int | float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.sized.append(self.trainer.estimated_stepping_batches)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    options = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "enable_checkpointing": False, **kwargs}  # fmt: skip
    return Trainer(default_root_dir=str(tmp_path), **options)


def test_an_unset_max_epochs_warns_and_is_1000_as_lightning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"max_epochs was not set.*1000 epochs.*max_epochs=-1"):
        trainer = _trainer(tmp_path)
    assert trainer.max_epochs == 1000
    with warnings.catch_warnings():  # something else bounds the fit: no warning, no epoch limit
        warnings.simplefilter("error")
        assert _trainer(tmp_path, max_steps=5).max_epochs == -1
        assert _trainer(tmp_path, max_time="00:00:01:00").max_epochs == -1
        assert _trainer(tmp_path, callbacks=[Timer(duration="00:00:01:00")]).max_epochs == -1
        assert _trainer(tmp_path, max_epochs=3).max_epochs == 3
        assert _trainer(tmp_path, fast_dev_run=True).max_epochs == 1


def test_a_deferred_stop_request_is_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class StopAtOnce(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            trainer.should_stop = True

    trainer = _trainer(tmp_path, min_epochs=2, max_epochs=5, callbacks=[StopAtOnce()])
    trainer.fit(Net(), _loader())
    assert trainer.current_epoch == 2  # the request waited for min_epochs
    err = capsys.readouterr().err
    assert err.count("min_epochs=2") == 1
    assert (
        "should_stop was set, but min_epochs=2 and min_steps=None are not reached: training continues" in err
    )
    _trainer(tmp_path, max_epochs=5, callbacks=[StopAtOnce()]).fit(Net(), _loader())
    assert "training continues" not in capsys.readouterr().err  # nothing deferred it


def test_a_progress_bar_with_enable_progress_bar_false_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"RichProgressBar.*enable_progress_bar=False"):
        _trainer(tmp_path, max_epochs=1, callbacks=[RichProgressBar()])
    bar = RichProgressBar()
    assert (
        _trainer(tmp_path, max_epochs=1, enable_progress_bar=True, callbacks=[bar]).progress_bar_callback
        is bar
    )


def test_an_explicit_deterministic_false_turns_the_global_mode_off(tmp_path: Path) -> None:
    try:
        torch.use_deterministic_algorithms(True)
        _trainer(tmp_path, max_epochs=1)  # not passed: left as it is (Lightning's None)
        assert torch.are_deterministic_algorithms_enabled()
        _trainer(tmp_path, max_epochs=1, deterministic=None)
        assert torch.are_deterministic_algorithms_enabled()
        _trainer(tmp_path, max_epochs=1, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_estimated_stepping_batches_with_max_epochs_0_counts_one_epoch(tmp_path: Path) -> None:
    module = Net()
    _trainer(tmp_path, max_epochs=0, accumulate_grad_batches=3).fit(module, _loader(20))
    assert module.sized == [2]  # ceil(5 batches / 3), as Lightning's max(max_epochs, 1)
    module = Net()
    _trainer(tmp_path, max_epochs=0, max_steps=1).fit(module, _loader(20))
    assert module.sized == [1]
