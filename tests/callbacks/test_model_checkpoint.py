"""ModelCheckpoint's Lightning options with a real Trainer: versioned names next to earlier runs'
checkpoints, save_weights_only, train_time_interval (also on 2 processes), verbose."""

from __future__ import annotations

import json
import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import random_loader as _loader

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


def test_a_fit_into_a_directory_that_holds_files_warns(tmp_path: Path) -> None:
    # As Lightning: each fit whose ModelCheckpoint may save (save_top_k != 0) warns on rank 0 when
    # its directory already holds something, resuming from a checkpoint there included.
    directory = tmp_path / "ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, ModelCheckpoint(dirpath=directory)).fit(Net(), _loader())
        (tmp_path / "empty").mkdir()
        _trainer(tmp_path, ModelCheckpoint(dirpath=tmp_path / "empty")).fit(Net(), _loader())
    assert not [w for w in caught if "not empty" in str(w.message)]
    message = f"Checkpoint directory {directory} exists and is not empty"
    with pytest.warns(UserWarning, match=re.escape(message)) as caught:
        _trainer(tmp_path, ModelCheckpoint(dirpath=directory)).fit(Net(), _loader())
    assert len([w for w in caught if "not empty" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match=re.escape(message)):
        _trainer(tmp_path, ModelCheckpoint(dirpath=directory), max_epochs=2).fit(
            Net(), _loader(), ckpt_path=str(directory / "epoch=0-step=4")
        )
    with warnings.catch_warnings(record=True) as caught:  # nothing to save, or not a fit: no warning
        warnings.simplefilter("always")
        _trainer(tmp_path, ModelCheckpoint(dirpath=directory, save_top_k=0)).fit(Net(), _loader())
        _trainer(tmp_path, ModelCheckpoint(dirpath=directory)).validate(Net(), _loader())
    assert not [w for w in caught if "not empty" in str(w.message)]


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
        ValueError, match=r"train_time_interval=60\) must be None or a datetime.timedelta >= 0"
    ):
        ModelCheckpoint(train_time_interval=60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be None or a datetime.timedelta >= 0"):
        ModelCheckpoint(train_time_interval=timedelta(seconds=-1))
    every = ModelCheckpoint(dirpath=tmp_path / "d", train_time_interval=timedelta(0), save_top_k=-1)
    _trainer(tmp_path, every, max_epochs=1).fit(Net(), _loader())  # 0, as Lightning: after every batch
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [f"epoch=0-step={i}" for i in range(1, 5)]


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


def _not_empty_worker(root: str) -> int:
    """How many "not empty" warnings this rank's fit into a directory holding a file gives."""
    directory = Path(root) / "ckpt"
    directory.mkdir(exist_ok=True)
    (directory / "notes.txt").write_text("kept")
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=[ModelCheckpoint(dirpath=directory)], strategy="ddp", max_epochs=1)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), _loader())
    return len([w for w in caught if "exists and is not empty" in str(w.message)])


def test_the_not_empty_warning_is_rank_0s_alone(tmp_path: Path) -> None:
    assert run_processes(_not_empty_worker, str(tmp_path)) == [1, 0]


# -- Lightning parity: the best without monitor, the resolved dirpath, tensor scores, `last`'s name ----


def test_without_monitor_the_newest_checkpoint_is_the_best(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1)
    trainer = _trainer(tmp_path, checkpoint, max_epochs=3)
    module = Net()
    trainer.fit(module, _loader())
    assert _names(directory) == ["epoch=0-step=4", "epoch=1-step=8", "epoch=2-step=12"]
    assert checkpoint.best_model_path == str(directory / "epoch=2-step=12")  # not the oldest
    assert checkpoint.best_model_score is None and checkpoint.kth_best_model_path == ""
    # ckpt_path="best" holds the fit's final weights
    assert torch.equal(Net.load_from_checkpoint(checkpoint.best_model_path).layer.weight, module.layer.weight)
    # every_n_epochs, and mode="max" (which ranks nothing without monitor): the newest still
    every = ModelCheckpoint(dirpath=tmp_path / "every", every_n_epochs=2, save_top_k=-1, mode="max")
    _trainer(tmp_path, every, max_epochs=4).fit(Net(), _loader())
    assert Path(every.best_model_path).name == "epoch=3-step=16"
    # A resumed fit goes on from the saved state: its new checkpoints are newer than the resumed ones.
    again = ModelCheckpoint(dirpath=directory, save_top_k=-1)
    _trainer(tmp_path, again, max_epochs=4).fit(Net(), _loader(), ckpt_path=checkpoint.best_model_path)
    assert again.best_model_path == str(directory / "epoch=3-step=16") and len(again.best_k_models) == 4


def test_dirpath_is_the_resolved_directory_once_set_up(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint()
    assert checkpoint.dirpath is None
    _trainer(tmp_path / "a", checkpoint).fit(Net(), _loader())
    assert checkpoint.dirpath == str(tmp_path / "a" / "checkpoints")
    assert _names(Path(checkpoint.dirpath)) == ["epoch=0-step=4"]
    _trainer(tmp_path / "b", checkpoint).fit(Net(), _loader())  # another Trainer: its directory
    assert checkpoint.dirpath == str(tmp_path / "b" / "checkpoints")
    mine = ModelCheckpoint(dirpath=tmp_path / "mine")  # the user's is kept as given
    _trainer(tmp_path / "c", mine).fit(Net(), _loader())
    assert mine.dirpath == str(tmp_path / "mine") and not (tmp_path / "c" / "checkpoints").exists()


def test_scores_are_cpu_tensors_and_saved_as_floats(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2)
    assert checkpoint.kth_best_model_path == "" and checkpoint.kth_value.item() == float("inf")
    assert ModelCheckpoint(monitor="val_loss", mode="max").kth_value.item() == float("-inf")
    _trainer(tmp_path, checkpoint, max_epochs=3).fit(Net(), _loader(), _loader(8))
    score = checkpoint.best_model_score
    assert isinstance(score, torch.Tensor) and score.dim() == 0 and score.device.type == "cpu"
    assert score.is_floating_point() and score.item() == min(
        v.item() for v in checkpoint.best_k_models.values()
    )
    assert all(isinstance(v, torch.Tensor) for v in checkpoint.best_k_models.values())
    assert len(checkpoint.best_k_models) == 2  # full: the kth best is the worse of the two
    worst = max(checkpoint.best_k_models, key=lambda p: checkpoint.best_k_models[p].item())
    assert checkpoint.kth_best_model_path == worst and checkpoint.kth_value is checkpoint.best_k_models[worst]
    state = checkpoint.state_dict()
    assert json.loads(json.dumps(state)) == state and isinstance(state["best_model_score"], float)
    saved = json.loads((Path(checkpoint.best_model_path) / "trainer_state.json").read_text())["callbacks"]
    assert {type(v) for v in saved[checkpoint.state_key]["best_k_models"].values()} == {float}
    fresh = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2)
    fresh.load_state_dict(state)
    assert isinstance(fresh.best_model_score, torch.Tensor) and torch.equal(fresh.best_model_score, score)
    assert fresh.kth_best_model_path == worst


def test_the_last_checkpoints_name_and_extension(tmp_path: Path) -> None:
    assert (ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION) == ("last", "")
    directory = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
    checkpoint.CHECKPOINT_NAME_LAST = "{epoch}-last"  # filled in like filename; the previous one goes
    assert checkpoint.last_name == "{epoch}-last"  # ember's earlier name: an alias
    _trainer(tmp_path, checkpoint, max_epochs=2).fit(Net(), _loader())
    assert _names(directory) == ["epoch=1-last", "epoch=1-step=8"]
    assert checkpoint.last_model_path == str(directory / "epoch=1-last")

    class Final(ModelCheckpoint):
        CHECKPOINT_NAME_LAST = "final"

    _trainer(tmp_path, Final(dirpath=tmp_path / "final", save_last=True)).fit(Net(), _loader())
    assert _names(tmp_path / "final") == ["epoch=0-step=4", "final"]
    resumed = Final(dirpath=tmp_path / "final", save_last=True)  # a new Trainer's "last" finds it
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    trainer.fit(Net(), _loader(), ckpt_path="last")
    assert trainer.global_step == 8 and resumed.last_model_path == str(tmp_path / "final" / "final")
    alias = ModelCheckpoint(dirpath=tmp_path / "alias", save_last=True, save_top_k=0)
    alias.last_name = "end"
    assert alias.CHECKPOINT_NAME_LAST == "end" and ModelCheckpoint.CHECKPOINT_NAME_LAST == "last"
    _trainer(tmp_path, alias).fit(Net(), _loader())
    assert _names(tmp_path / "alias") == ["end"]

    missing = ModelCheckpoint(dirpath=tmp_path / "missing", save_last=True)
    missing.CHECKPOINT_NAME_LAST = "{nope}-last"
    with pytest.raises(
        KeyError, match=r"CHECKPOINT_NAME_LAST='\{nope\}-last' uses 'nope', which was not logged"
    ):
        _trainer(tmp_path, missing).fit(Net(), _loader())
    suffixed = ModelCheckpoint(dirpath=tmp_path / "suffixed")
    suffixed.FILE_EXTENSION = ".ckpt"
    with pytest.raises(
        ValueError, match=r"FILE_EXTENSION='.ckpt': .* directories.* the only valid value is ''"
    ):
        _trainer(tmp_path, suffixed).fit(Net(), _loader())
    with pytest.raises(ValueError, match=r"save_last='link'\): valid choices are True, False and None"):
        ModelCheckpoint(save_last="link")  # type: ignore[arg-type]
