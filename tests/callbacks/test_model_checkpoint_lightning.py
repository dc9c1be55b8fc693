"""ModelCheckpoint against Lightning 2.6.6 (the values found by running the same fits with
Lightning): NaN ranks as the worst value, a step's checkpoint waits for the validation that gives
its monitor, verbose's "as top N", save_on_exception, format_checkpoint_name and current_score."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import random_loader as _loader

from ember import Trainer, TrainModule
from ember.callbacks import ModelCheckpoint


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root: Path, checkpoint: ModelCheckpoint, **kwargs: Any) -> Trainer:
    return Trainer(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                   logger=False, callbacks=[checkpoint], **{"max_epochs": 1, **kwargs})  # fmt: skip


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


class ScriptedNet(Net):
    """Logs ``val_loss`` from a script: the n-th validation run of the fit logs ``values[n]``."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.runs = values, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(self.values[min(self.runs, len(self.values) - 1)]))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.runs += 1


def test_a_nan_value_ranks_as_the_worst_and_is_kept_while_there_is_room(tmp_path: Path) -> None:
    # Lightning 2.6.6: the NaN checkpoint is saved with the score inf (mode="min"), never replaces
    # one, and is the first to go.
    nan = float("nan")
    directory = tmp_path / "one"
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", filename="{epoch}-{val_loss:.2f}")
    _trainer(tmp_path, checkpoint, max_epochs=2, num_sanity_val_steps=0).fit(
        ScriptedNet([nan, nan]), _loader(), _loader(8)
    )
    assert _names(directory) == ["epoch=0-val_loss=nan"]
    assert checkpoint.best_model_score is not None and float(checkpoint.best_model_score) == float("inf")
    directory = tmp_path / "two"
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", mode="max", save_top_k=2)
    _trainer(tmp_path, checkpoint, max_epochs=3, num_sanity_val_steps=0).fit(
        ScriptedNet([nan, 2.0, 3.0]), _loader(), _loader(8)
    )
    assert _names(directory) == ["epoch=1-step=8", "epoch=2-step=12"]
    assert {Path(p).name: float(s) for p, s in checkpoint.best_k_models.items()} == {
        "epoch=1-step=8": 2.0,
        "epoch=2-step=12": 3.0,
    }


def test_a_step_checkpoint_waits_for_the_validation_that_gives_its_monitor(tmp_path: Path) -> None:
    # Lightning 2.6.6: with validation every 2 batches, step 1 has no val_loss yet and step 2's
    # validation runs after the batch: both wait for the validation run (step 2's saves then). The
    # epoch's last step waits too, for fresh values rather than the previous validation's.
    directory = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(
        dirpath=directory, monitor="val_loss", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    trainer = _trainer(tmp_path, checkpoint, val_check_interval=2, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (waiting is silent, as in Lightning)
        trainer.fit(Net(), _loader(), _loader(8))
    assert _names(directory) == ["epoch=0-step=2", "epoch=0-step=3", "epoch=0-step=4", "last"]
    scores = {Path(p).name: float(s) for p, s in checkpoint.best_k_models.items()}
    assert scores["epoch=0-step=4"] == float(trainer.callback_metrics["val_loss"])  # the last validation's
    # Validation every 2nd epoch: step 4 (epoch 0) has no value and no validation follows it in its
    # epoch; steps 8 and 16 end epochs that validate, and wait for it; step 12 uses epoch 1's value.
    directory = tmp_path / "every2"
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, checkpoint, max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0).fit(
        Net(), _loader(), _loader(8)
    )
    assert _names(directory) == ["epoch=1-step=8", "epoch=2-step=12", "epoch=3-step=16"]


def test_verbose_with_save_top_k_minus_one_counts_the_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning 2.6.6 says "as top 1", then "as top 2": how many are kept, not -1.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "all", monitor="val_loss", save_top_k=-1, verbose=True)
    _trainer(tmp_path, checkpoint, max_epochs=2, num_sanity_val_steps=0).fit(
        ScriptedNet([2.0, 1.0]), _loader(), _loader(8)
    )
    out = capsys.readouterr().out
    assert (
        "reached 2.00000 (best 2.00000)" in out and out.count("as top 1") == 1 and out.count("as top 2") == 1
    )
    assert "as top -1" not in out


class FailsAtStep5(Net):
    fail = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail and self.trainer.global_step == 5:
            raise RuntimeError("the data server went away")
        return super().training_step(batch, batch_idx)


def test_save_on_exception_saves_where_the_fit_failed_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning 2.6's save_on_exception: the failure's checkpoint is named from `filename` (with
    # `last` too) and is not one of the ranked ones.
    directory = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=directory, save_on_exception=True, save_last=True)
    module = FailsAtStep5()
    with pytest.raises(RuntimeError, match="data server"):
        _trainer(tmp_path, checkpoint, max_epochs=2).fit(module, _loader())
    assert _names(directory) == ["epoch=0-step=4", "epoch=1-step=5", "last"]
    assert Path(checkpoint.best_model_path).name == "epoch=0-step=4"
    assert list(map(str, checkpoint.best_k_models)) == [checkpoint.best_model_path]
    assert "RuntimeError" in capsys.readouterr().err
    module.fail = False
    resumed = ModelCheckpoint(dirpath=tmp_path / "again")
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    trainer.fit(module, _loader(), ckpt_path=str(directory / "epoch=1-step=5"))
    assert trainer.global_step == 8
    # Off by default; and no second copy of a step already saved.
    plain = ModelCheckpoint(dirpath=tmp_path / "plain")
    with pytest.raises(RuntimeError):
        _trainer(tmp_path, plain, max_epochs=2).fit(FailsAtStep5(), _loader())
    assert _names(tmp_path / "plain") == ["epoch=0-step=4"]
    # A field not logged yet reads nan (Lightning's reads 0): the failure's checkpoint is still saved.
    named = ModelCheckpoint(
        dirpath=tmp_path / "named",
        filename="{epoch}-{val_loss:.2f}",
        every_n_epochs=0,
        save_on_exception=True,
    )
    with pytest.raises(RuntimeError):
        _trainer(tmp_path, named, max_epochs=2).fit(FailsAtStep5(), _loader())
    assert _names(tmp_path / "named") == ["epoch=1-val_loss=nan"]
    with pytest.raises(TypeError, match=r"save_on_exception=.yes."):
        ModelCheckpoint(save_on_exception="yes")  # type: ignore[arg-type]


def _exception_worker(root: str) -> list[str]:
    directory = Path(root) / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=directory, save_on_exception=True, save_last=True)
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=[checkpoint], strategy="ddp", max_epochs=2)  # fmt: skip
    with pytest.raises(RuntimeError, match="data server"):
        trainer.fit(FailsAtStep5(), _loader(32))  # (4 steps an epoch on each of the 2 processes)
    return _names(directory)


def test_save_on_exception_on_two_processes_that_fail_together(tmp_path: Path) -> None:
    assert (
        run_processes(_exception_worker, str(tmp_path)) == [["epoch=0-step=4", "epoch=1-step=5", "last"]] * 2
    )


def test_format_checkpoint_name_and_current_score_as_lightning(tmp_path: Path) -> None:
    # Lightning 2.6.6's format_checkpoint_name examples, without its ".ckpt".
    def name(checkpoint: ModelCheckpoint, metrics: dict[str, Any], **kwargs: Any) -> str:
        return Path(checkpoint.format_checkpoint_name(metrics, **kwargs)).name

    assert name(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}"), {"epoch": 0}) == "epoch=0"
    assert name(ModelCheckpoint(dirpath=tmp_path, filename="{epoch:03d}"), {"epoch": 5}) == "epoch=005"
    two = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{val_loss:.2f}")
    assert name(two, {"epoch": 2, "val_loss": torch.tensor(0.123456)}) == "epoch=2-val_loss=0.12"
    assert name(two, {"epoch": 2, "val_loss": 0.12}, filename="{epoch:d}") == "epoch=2"
    assert name(two, {"epoch": 2, "val_loss": 0.12}, ver=3, prefix="run") == "run-epoch=2-val_loss=0.12-v3"
    plain = ModelCheckpoint(
        dirpath=tmp_path,
        filename="epoch={epoch}-validation_loss={val_loss:.2f}",
        auto_insert_metric_name=False,
    )
    assert name(plain, {"epoch": 2, "val_loss": 0.123456}) == "epoch=2-validation_loss=0.12"
    assert (
        ModelCheckpoint(filename="{step}").format_checkpoint_name({"step": 0}) == "step=0"
    )  # no dirpath yet
    assert two.format_checkpoint_name({"epoch": 1, "val_loss": 1.0}) == str(
        tmp_path / "epoch=1-val_loss=1.00"
    )
    # current_score: the score of the newest ranked checkpoint (None before one), as Lightning's.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss", save_top_k=1)
    assert checkpoint.current_score is None
    _trainer(tmp_path, checkpoint, max_epochs=3, num_sanity_val_steps=0).fit(
        ScriptedNet([2.0, 1.0, 3.0]), _loader(), _loader(8)
    )
    assert checkpoint.current_score is not None and float(checkpoint.current_score) == 1.0
