"""TQDMProgressBar: Lightning's tqdm bars in a real fit / validate / test / predict, drawn to a text stream."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader as _loader

from ember import Trainer, TrainModule
from ember.callbacks import RichProgressBar, TQDMProgressBar


class Regressor(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", F.mse_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, bar: TQDMProgressBar, **kwargs: Any) -> Trainer:
    return Trainer(default_root_dir=str(tmp_path), callbacks=[bar], logger=False, enable_checkpointing=False,
                   enable_model_summary=False, **kwargs)  # fmt: skip


def test_a_fit_draws_the_epoch_bar_with_the_loss_and_the_evaluation_bars(tmp_path: Path) -> None:
    stream = io.StringIO()
    trainer = _trainer(tmp_path, TQDMProgressBar(file=stream), max_epochs=2)
    trainer.fit(Regressor(), _loader(), _loader(8))
    drawn = stream.getvalue()
    assert "Sanity Checking DataLoader 0" in drawn
    assert re.search(r"Epoch 0: 100%\|[^|]*\| 4/4 \[.*loss=\d\.\d{4}", drawn), drawn
    assert re.search(r"Epoch 1: 100%.* 4/4 .*loss=\d\.\d{4}, val_loss=\d\.\d{4}\]", drawn), drawn
    assert "Validation DataLoader 0: 100%" in drawn and " 2/2 " in drawn
    assert " 1/4 " in drawn and " 3/4 " in drawn  # refresh_rate=1: every batch
    # It replaces ember's default bar; the bars are closed when the fit ends.
    assert not any(isinstance(c, RichProgressBar) for c in trainer.callbacks)

    stream.seek(0)
    stream.truncate()
    trainer.test(Regressor(), _loader(8), verbose=False)
    trainer.predict(Regressor(), [_loader(8), _loader(4)])
    drawn = stream.getvalue()
    assert re.search(r"Testing DataLoader 0: 100%.* 2/2 ", drawn), drawn  # the totals are known
    assert re.search(r"Predicting DataLoader 0: 100%.* 2/2 ", drawn), drawn
    assert re.search(r"Predicting DataLoader 1: 100%.* 1/1 ", drawn), drawn
    assert (trainer.num_test_batches, trainer.num_predict_batches) == ([2], [2, 1])


def test_the_default_stream_is_stdout_and_refresh_rate_thins_the_redraws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _trainer(tmp_path, TQDMProgressBar(refresh_rate=2), max_epochs=1).fit(Regressor(), _loader())
    drawn = capsys.readouterr().out
    assert "Epoch 0: 100%" in drawn and " 2/4 " in drawn and " 4/4 " in drawn
    assert " 1/4 " not in drawn and " 3/4 " not in drawn


def test_leave_keeps_a_bar_per_epoch(tmp_path: Path) -> None:
    stream = io.StringIO()
    _trainer(tmp_path, TQDMProgressBar(leave=True, file=stream), max_epochs=2).fit(Regressor(), _loader())
    final_lines = [line.split("\r")[-1] for line in stream.getvalue().split("\n")]
    assert sum(line.startswith("Epoch 0: 100%") for line in final_lines) == 1
    assert sum(line.startswith("Epoch 1: 100%") for line in final_lines) == 1


def test_refresh_rate_zero_draws_nothing(tmp_path: Path) -> None:
    stream = io.StringIO()
    bar = TQDMProgressBar(refresh_rate=0, file=stream)
    trainer = _trainer(tmp_path, bar, max_epochs=1)
    trainer.fit(Regressor(), _loader(), _loader(8))
    trainer.test(Regressor(), _loader(8), verbose=False)
    assert stream.getvalue() == ""
    assert {"on_train_batch_end", "on_validation_batch_end"} <= bar.inactive_hooks(trainer)
    assert not any(isinstance(c, RichProgressBar) for c in trainer.callbacks)


def test_bad_arguments_and_a_missing_tqdm_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"TQDMProgressBar\(refresh_rate=-1\) must be an int >= 0"):
        TQDMProgressBar(refresh_rate=-1)
    with pytest.raises(TypeError, match=r"process_position=1\.5"):
        TQDMProgressBar(process_position=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="leave"):
        TQDMProgressBar(leave=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="file"):
        TQDMProgressBar(file="out.txt")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "tqdm", None)  # importing it fails, as when it is missing
    with pytest.raises(ModuleNotFoundError, match="pip install tqdm"):
        TQDMProgressBar()


class BarFromModule(Regressor):
    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar = bar

    def configure_callbacks(self) -> list[Any]:
        return [self.bar]


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_a_bar_from_configure_callbacks_replaces_the_trainers(tmp_path: Path, bar: str) -> None:
    stream = io.StringIO()
    theirs = TQDMProgressBar(file=stream) if bar == "tqdm" else RichProgressBar()
    ours = RichProgressBar() if bar == "tqdm" else TQDMProgressBar(file=stream)
    trainer = Trainer(default_root_dir=str(tmp_path), callbacks=[ours], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, max_epochs=1)  # fmt: skip
    trainer.fit(BarFromModule(theirs), _loader())
    bars = [c for c in trainer.callbacks if c.progress_bar]
    assert bars == [theirs]  # one bar: the module's
