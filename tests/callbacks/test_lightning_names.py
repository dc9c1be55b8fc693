"""Lightning's callback base classes and aliases under their names: ``Checkpoint``, ``RichModelSummary``,
``ProgressBar`` (for bars of one's own, and the base of the built-in bars)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from rich.console import Console
from small_fit import regression_loader
from torch import nn

from ember import Trainer, TrainModule
from ember.callbacks import (
    Checkpoint,
    ModelCheckpoint,
    ModelSummary,
    OnExceptionCheckpoint,
    ProgressBar,
    RichModelSummary,
    RichProgressBar,
    TQDMProgressBar,
)


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_is_the_base_of_the_checkpointing_callbacks(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=1,
                      callbacks=[OnExceptionCheckpoint(tmp_path)])  # fmt: skip
    # As in Lightning, trainer.callbacks holds the given callbacks and the defaults from the start.
    assert [type(c) for c in trainer.callbacks if isinstance(c, Checkpoint)] == [
        OnExceptionCheckpoint,
        ModelCheckpoint,
    ]
    trainer.fit(Net(), regression_loader())
    found = [type(c) for c in trainer.callbacks if isinstance(c, Checkpoint)]
    assert found == [OnExceptionCheckpoint, ModelCheckpoint]


def test_rich_model_summary_replaces_the_default_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = RichModelSummary(max_depth=2)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=1,
                      enable_checkpointing=False, callbacks=[summary])  # fmt: skip
    trainer.fit(Net(), regression_loader())
    assert [c for c in trainer.callbacks if isinstance(c, ModelSummary)] == [summary]
    out = capsys.readouterr().out
    assert out.count("Total params") == 1 and "net.0" in out  # depth 2: the Sequential's layers
    with pytest.raises(ValueError, match=r"ModelSummary\(max_depth=-2\)"):
        RichModelSummary(max_depth=-2)


# -- ProgressBar ---------------------------------------------------------------------------------------
class Logging(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", F.mse_loss(self.net(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.net(batch[0])


class Recording(ProgressBar):
    """A bar of one's own: records what the base class gives it at each stage."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.seen.append((self.train_description, self.total_train_batches))

    def on_sanity_check_start(self, trainer: Any, module: Any) -> None:
        self.seen.append((self.sanity_check_description, self.total_val_batches))

    def on_validation_batch_start(
        self, trainer: Any, module: Any, batch: Any, batch_idx: int, idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(idx):
            self.seen.append((self.validation_description, self.total_val_batches_current_dataloader))

    def on_test_start(self, trainer: Any, module: Any) -> None:
        self.has_dataloader_changed(0)
        self.seen.append((self.test_description, self.total_test_batches_current_dataloader))

    def on_predict_start(self, trainer: Any, module: Any) -> None:
        self.has_dataloader_changed(1)
        self.seen.append((self.predict_description, self.total_predict_batches_current_dataloader))

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.seen.append(("metrics", sorted(self.get_metrics(trainer, module))))
        self.reset_dataloader_idx_tracker()


def test_a_bar_of_ones_own_replaces_the_default_and_gets_the_counts(tmp_path: Path) -> None:
    bar = Recording()
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[bar], num_sanity_val_steps=1)  # fmt: skip
    assert trainer.progress_bar_callback is bar
    with pytest.raises(TypeError, match="Recording.trainer is not set yet"):
        _ = bar.trainer
    loader = regression_loader(batch_size=4)  # 4 batches
    trainer.fit(Logging(), loader, [loader, regression_loader(batch_size=8)])
    assert bar.trainer is trainer
    trainer.test(Logging(), loader, verbose=False)
    trainer.predict(Logging(), [loader, regression_loader(batch_size=8)])
    # The sanity check runs one batch of each validation loader, then the fit's validation all of them.
    assert bar.seen == [("Sanity Checking", 2), ("Validation", 1), ("Validation", 1), ("Training", 4),
                        ("Validation", 4), ("Validation", 2), ("metrics", ["loss"]), ("Testing", 4),
                        ("Predicting", 2)]  # fmt: skip
    assert not any(type(c).__name__ == "RichProgressBar" for c in trainer.callbacks)


class Quiet(RichProgressBar):
    def get_metrics(self, trainer: Any, module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("loss", None)
        return {**metrics, "shown": 7}


def test_get_metrics_decides_what_the_built_in_bars_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[Quiet(plain_every_n_batches=2)])  # fmt: skip
    trainer.fit(Logging(), regression_loader(batch_size=4))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert lines and all("shown=7" in line and "loss" not in line for line in lines), lines
    stream = io.StringIO()
    tqdm_bar = TQDMProgressBar(file=stream)
    tqdm_bar.get_metrics = lambda trainer, module: {"shown": 7}  # type: ignore[method-assign]
    Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
            enable_model_summary=False, callbacks=[tqdm_bar]).fit(Logging(), regression_loader(batch_size=4))  # fmt: skip
    assert "shown=7" in stream.getvalue() and "loss=" not in stream.getvalue()


class Enabled(ProgressBar):
    """Records ``is_enabled`` at each training batch: what a bar of one's own asks before drawing."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(self.is_enabled)


def _ddp_bar_worker(root: str) -> list[bool]:
    bar = Enabled()
    Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, max_epochs=1, strategy="ddp",
            enable_model_summary=False, callbacks=[bar]).fit(Net(), regression_loader(batch_size=4))  # fmt: skip
    return bar.seen


def test_a_bar_is_disabled_on_every_process_but_global_rank_zero(tmp_path: Path) -> None:
    # As Lightning's ProgressBar.setup: a bar of one's own that asks is_enabled draws once, not per process.
    assert run_processes(_ddp_bar_worker, str(tmp_path)) == [[True, True], [False, False]]


class Printing(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.print(f"printed at batch {batch_idx}")
        return super().training_step(batch, batch_idx)


def test_module_print_goes_through_the_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # As Lightning's LightningModule.print: above the bar (tqdm.write to the bar's stream), not
    # through it; a disabled bar leaves it to print.
    stream = io.StringIO()
    bar = TQDMProgressBar(file=stream)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[bar])  # fmt: skip
    trainer.fit(Printing(), regression_loader(batch_size=4))
    assert stream.getvalue().count("printed at batch") == 4
    assert "printed at batch" not in capsys.readouterr().out
    bar.disable()
    trainer.fit(Printing(), regression_loader(batch_size=4))
    assert capsys.readouterr().out.count("printed at batch") == 4


class Flushing(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.print("printed", batch_idx, sep=": ", flush=True)  # (print's keywords, not all rich's)
        return super().training_step(batch, batch_idx)


def test_module_print_above_live_rich_bars_takes_the_keywords_of_print(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    terminal = io.StringIO()
    bar = RichProgressBar(console=Console(file=terminal, force_terminal=True, width=150))
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[bar])  # fmt: skip
    trainer.fit(Flushing(), regression_loader(batch_size=4))
    assert [f"printed: {i}" in terminal.getvalue() for i in range(4)] == [True] * 4


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_a_disabled_bar_draws_nothing_until_enabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    stream = io.StringIO()
    bar: ProgressBar = (
        RichProgressBar(plain_every_n_batches=1) if kind == "rich" else TQDMProgressBar(file=stream)
    )
    bar.disable()
    assert bar.is_disabled and not bar.is_enabled
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[bar])  # fmt: skip
    trainer.fit(Logging(), regression_loader(batch_size=4))
    assert capsys.readouterr().out.count("epoch 0") == 0 and stream.getvalue() == ""
    bar.enable()
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_epochs=1,
                      enable_model_summary=False, callbacks=[bar])  # fmt: skip
    trainer.fit(Logging(), regression_loader(batch_size=4))
    drawn = capsys.readouterr().out if kind == "rich" else stream.getvalue()
    assert ("epoch 0" if kind == "rich" else "Epoch 0") in drawn
