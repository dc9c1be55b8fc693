"""ModelCheckpoint's Lightning options with a real Trainer: versioned names next to earlier runs'
checkpoints, save_weights_only, train_time_interval (also on 2 processes), verbose."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch.utils.data import DataLoader, TensorDataset

from ember import CheckpointError, Trainer, TrainModule
from ember.callbacks import Callback, ModelCheckpoint


class Net(TrainModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4
    )


def _trainer(root: Path, checkpoint: ModelCheckpoint, **kwargs: Any) -> Trainer:
    return Trainer(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                   logger=False, callbacks=[checkpoint], **{"max_epochs": 1, **kwargs})  # fmt: skip


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_a_second_run_in_the_same_directory_keeps_the_first_runs_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _trainer(tmp_path, ModelCheckpoint(dirpath=directory, save_last=True)).fit(Net(), _loader())
    first = {name: (directory / name / "manifest.json").read_bytes() for name in _names(directory)}
    assert sorted(first) == ["epoch=0-step=4", "last"]
    _trainer(tmp_path, ModelCheckpoint(dirpath=directory, save_last=True)).fit(Net(lr=0.2), _loader())
    assert _names(directory) == ["epoch=0-step=4", "epoch=0-step=4-v1", "last", "last-v1"]
    for name, manifest in first.items():  # untouched
        assert (directory / name / "manifest.json").read_bytes() == manifest
    # A new Trainer's ckpt_path="last" finds the newest `last`: the second run's.
    trainer = _trainer(tmp_path, ModelCheckpoint(dirpath=directory, save_last=True), max_epochs=2)
    module = Net()
    trainer.fit(module, _loader(), ckpt_path="last")
    assert module.hparams.lr == 0.1 and trainer.checkpoint_callback.last_model_path == str(
        directory / "last-v1"
    )
    assert trainer.global_step == 8
    # enable_version_counter=False: Lightning's overwrite, for a checkpoint of the same name.
    _trainer(tmp_path, ModelCheckpoint(dirpath=directory, enable_version_counter=False)).fit(Net(), _loader())
    assert "epoch=0-step=4-v2" not in _names(directory)
    assert (directory / "epoch=0-step=4" / "manifest.json").read_bytes() != first["epoch=0-step=4"]


def test_save_weights_only(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trainer = _trainer(tmp_path, ModelCheckpoint(dirpath=directory, save_weights_only=True, save_last=True))
    module = Net(lr=0.3)
    trainer.fit(module, _loader(), _loader(8))
    path = directory / "epoch=0-step=4"
    files = _names(path)
    assert "model.safetensors" in files and not [
        f for f in files if f.startswith(("optimizer", "rng", "dataloaders"))
    ]
    assert json.loads((path / "manifest.json").read_text())["weights_only"] is True
    loaded = Net.load_from_checkpoint(path)
    assert loaded.hparams.lr == 0.3 and torch.equal(loaded.layer.weight, module.layer.weight)
    assert trainer.validate(Net(), _loader(8), ckpt_path=str(path))[0]["val_loss"] >= 0
    with pytest.raises(CheckpointError, match=r"holds model weights only .* training cannot resume from it"):
        _trainer(tmp_path, ModelCheckpoint(dirpath=tmp_path / "other")).fit(
            Net(), _loader(), ckpt_path=str(path)
        )
    # An automatic resume looks past them: here there is nothing it could resume from.
    trainer = _trainer(tmp_path, ModelCheckpoint(dirpath=directory), auto_resume=True)
    trainer.fit(Net(), _loader())
    assert trainer.global_step == 4  # started afresh
    with pytest.raises(TypeError, match=r"save_checkpoint\(weights_only=1\) must be True or False"):
        trainer.save_checkpoint(tmp_path / "x", weights_only=1)  # type: ignore[arg-type]


def test_train_time_interval_and_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "a", train_time_interval=timedelta(microseconds=1), verbose=True
    )
    _trainer(tmp_path, checkpoint).fit(Net(), _loader())
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"Epoch 0, global step {s}" for s in (1, 2, 3, 4)]
    assert lines[-1].endswith(f"saving model to {str(tmp_path / 'a' / 'epoch=0-step=4')!r}")
    assert _names(tmp_path / "a") == ["epoch=0-step=4"]  # no monitor: the newest only
    hour = ModelCheckpoint(dirpath=tmp_path / "b", train_time_interval=timedelta(hours=1))
    _trainer(tmp_path, hour).fit(Net(), _loader())
    assert not (tmp_path / "b").exists()  # not due, and no epoch saves with a time interval
    ranked = ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss", verbose=True, every_n_epochs=1)
    _trainer(tmp_path, ranked, max_epochs=3).fit(Net(lr=5.0), _loader(), _loader(8))  # diverges
    out = capsys.readouterr().out
    assert "'val_loss' reached" in out and "as top 1" in out and "'val_loss' was not in top 1" in out
    with pytest.raises(ValueError, match=r"every_n_train_steps=2, train_time_interval=.* are exclusive"):
        ModelCheckpoint(every_n_train_steps=2, train_time_interval=timedelta(minutes=1))
    with pytest.raises(
        ValueError, match=r"train_time_interval=60\) must be None or a positive datetime.timedelta"
    ):
        ModelCheckpoint(train_time_interval=60)  # type: ignore[arg-type]


def _time_worker(root: str, due_on: int) -> list[str]:
    """Rank ``due_on``'s clock says a save is due at every batch; the other's never does."""

    class Clock(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_rank == due_on:
                trainer.checkpoint_callback._last_time = -1e9

    checkpoint = ModelCheckpoint(dirpath=Path(root) / "ckpt", train_time_interval=timedelta(hours=1))
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=[checkpoint, Clock()], strategy="ddp", max_epochs=1)  # fmt: skip
    trainer.fit(Net(), _loader())
    directory = Path(root) / "ckpt"
    return _names(directory) if directory.exists() else []


def test_train_time_interval_on_two_processes_follows_rank_0s_clock(tmp_path: Path) -> None:
    # Rank 1 alone due: nobody saves (a save by one rank alone would wait forever for the other).
    assert run_processes(_time_worker, str(tmp_path / "one"), 1) == [[], []]
    # Rank 0 due: both save, every step (2 steps of 2 batches per rank).
    assert run_processes(_time_worker, str(tmp_path / "zero"), 0) == [["epoch=0-step=2"]] * 2
