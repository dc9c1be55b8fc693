"""The progress bars against Lightning 2.6.6's: get_metrics' v_num, is_enabled, the epoch bar's total."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader as _loader

from ember import Trainer, TrainModule
from ember.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from ember.trainer.loggers import CSVLogger


class Regressor(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, bar: ProgressBar, logger: Any, **kwargs: Any) -> tuple[Trainer, Regressor]:
    trainer = Trainer(default_root_dir=str(tmp_path), callbacks=[bar], logger=logger, enable_checkpointing=False,
                      enable_model_summary=False, log_every_n_steps=1, **{"max_epochs": 1, **kwargs})  # fmt: skip
    module = Regressor()
    trainer.fit(module, _loader())
    return trainer, module


@pytest.mark.parametrize(
    ("logger", "expected"),
    [(None, 0), (lambda p: CSVLogger(str(p), version="run-abcdefgh"), "efgh"), (False, None)],
)
def test_get_metrics_adds_the_loggers_version_as_v_num(tmp_path: Path, logger: Any, expected: Any) -> None:
    stream = io.StringIO()
    bar = TQDMProgressBar(file=stream)
    trainer, module = _fit(tmp_path, bar, logger(tmp_path) if callable(logger) else logger)
    metrics = bar.get_metrics(trainer, module)
    if expected is None:  # no logger: only what was logged (Lightning's)
        assert list(metrics) == ["loss"]
    else:  # first, then the logged values; a str version: its last 4 characters
        assert list(metrics) == ["v_num", "loss"] and metrics["v_num"] == expected
        assert f"v_num={expected}, loss=" in stream.getvalue()
    assert "v_num" not in trainer.progress_bar_metrics


def test_v_num_of_several_loggers_and_a_logged_v_num_warns(tmp_path: Path) -> None:
    class LogsVNum(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.log("v_num", 7.0, prog_bar=True)
            return super().training_step(batch, batch_idx)

    loggers = [CSVLogger(str(tmp_path), version=3), CSVLogger(str(tmp_path), name="b", version="x")]
    trainer = Trainer(default_root_dir=str(tmp_path), logger=loggers, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, max_epochs=1, log_every_n_steps=1)  # fmt: skip
    bar = ProgressBar()
    assert bar.get_metrics(trainer, Regressor())["v_num"] == "3_x"
    trainer.fit(LogsVNum(), _loader())
    with pytest.warns(UserWarning, match="'v_num'"):
        assert bar.get_metrics(trainer, trainer.module)["v_num"] == 7.0  # the logged value wins


@pytest.mark.parametrize("bar_type", [RichProgressBar, TQDMProgressBar])
def test_is_enabled_is_false_with_refresh_rate_zero(bar_type: type[ProgressBar]) -> None:
    bar = bar_type(refresh_rate=0)
    assert (bar.is_enabled, bar.is_disabled, bar.refresh_rate) == (False, True, 0)
    bar = bar_type(refresh_rate=2)
    assert (bar.is_enabled, bar.refresh_rate) == (True, 2)
    bar.disable()
    assert bar.is_disabled
    bar.enable()
    assert bar.is_enabled


def test_the_epoch_bars_count_the_steps_left_under_max_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_epochs=-1 and max_steps=6, 4 batches an epoch: epoch 1 has 2 steps left (Lightning's total).
    stream = io.StringIO()
    _fit(tmp_path, TQDMProgressBar(file=stream), False, max_epochs=-1, max_steps=6)
    assert re.search(r"Epoch 1: 100%.* 2/2 ", stream.getvalue()), stream.getvalue()

    from rich.console import Console

    monkeypatch.delenv("CI", raising=False)
    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    _fit(tmp_path, RichProgressBar(leave=True, console=console), False, max_epochs=-1, max_steps=6)
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert re.search(r"Epoch 1 [^\x1b\n]* 2/2 ", drawn), drawn
    assert not re.search(r"Epoch 1 [^\x1b\n]*/4 ", drawn), drawn


def test_rich_theme_and_console_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from ember.callbacks import RichProgressBarTheme

    monkeypatch.delenv("CI", raising=False)
    # console_kwargs: the Console the bars draw on (Lightning's), here a terminal writing to a buffer.
    stream = io.StringIO()
    theme = RichProgressBarTheme(metrics_format=".2f", metrics_text_delimiter=" | ")
    bar = RichProgressBar(theme=theme, console_kwargs={"file": stream, "force_terminal": True, "width": 200,
                                                       "color_system": "truecolor"})  # fmt: skip
    _fit(tmp_path, bar, None)
    drawn = stream.getvalue()
    assert re.search(r"v_num: 0\.00 \| loss: \d\.\d\d(?!\d)", drawn), drawn  # Lightning's metric format
    assert "38;2;98;6;224" in drawn  # the bar in the theme's colour, #6206E0
    assert "Epoch 0" in drawn and " 4/4 " in drawn

    console = Console(file=io.StringIO())
    with pytest.raises(TypeError, match="console_kwargs"):
        RichProgressBar(console_kwargs={"not_an_option": 1})
    with pytest.raises(ValueError, match="console=.*console_kwargs"):
        RichProgressBar(console=console, console_kwargs={"width": 80})
    with pytest.raises(TypeError, match="theme="):
        RichProgressBar(theme="dark")  # type: ignore[arg-type]
