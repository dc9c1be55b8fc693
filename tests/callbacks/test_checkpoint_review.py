"""ModelCheckpoint corners compared with Lightning 2.6: resuming into another directory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import LinearRegression
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer
from ember.callbacks import LambdaCallback, ModelCheckpoint, OnExceptionCheckpoint


class Net(LinearRegression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)), batch_size=4
    )


def _fit(root: Path, checkpoint: ModelCheckpoint, epochs: int, ckpt_path: str | None = None) -> Trainer:
    trainer = Trainer(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                      logger=False, callbacks=[checkpoint], max_epochs=epochs, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Net(), _loader(), _loader(), ckpt_path=ckpt_path)
    return trainer


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_resuming_into_another_dirpath_leaves_the_old_directory_alone(tmp_path: Path) -> None:
    first = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val_loss", save_top_k=2, save_last=True)
    _fit(tmp_path, first, 3)
    kept = _names(tmp_path / "a")
    assert len(kept) == 3
    # As Lightning: another dirpath restores best_model_path only, with a warning, and ranks afresh.
    second = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val_loss", save_top_k=2, save_last=True)
    with pytest.warns(UserWarning, match=r"dirpath has changed from '.*/a' to '.*/b'"):
        _fit(tmp_path, second, 5, ckpt_path=first.last_model_path)
    assert _names(tmp_path / "a") == kept  # none of the first run's checkpoints removed
    assert _names(tmp_path / "b") == ["epoch=3-step=16", "epoch=4-step=20", "last"]
    assert all(Path(path).parent == tmp_path / "b" for path in second.best_k_models)
    assert second.last_model_path == str(tmp_path / "b" / "last")
    # The same directory restores everything: the ranking goes on.
    third = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val_loss", save_top_k=2, save_last=True)
    _fit(tmp_path, third, 6, ckpt_path="last")
    assert set(third.best_k_models) <= {*second.best_k_models, str(tmp_path / "b" / "epoch=5-step=24")}
    assert len(third.best_k_models) == 2 and _names(tmp_path / "b")[-1] == "last"


@pytest.mark.parametrize("monitor", ["val_loss", None])
def test_a_fixed_name_is_written_over_by_the_checkpoint_it_supersedes(
    tmp_path: Path, monitor: str | None
) -> None:
    # Lightning's ModelCheckpoint(filename="best", monitor=..., save_top_k=1) keeps one `best`; so does
    # every_n_train_steps=1 with filename="{epoch}": the new checkpoint replaces the one it supersedes.
    if monitor is None:
        checkpoint = ModelCheckpoint(
            dirpath=tmp_path / "c", filename="{epoch}", every_n_train_steps=1, save_last=True
        )
    else:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "c", filename="best", monitor=monitor, save_last=True)
    trainer = _fit(tmp_path, checkpoint, 4)
    name = "best" if monitor else "epoch=3"
    assert _names(tmp_path / "c") == [name, "last"]
    assert checkpoint.best_model_path == str(tmp_path / "c" / name) and list(checkpoint.best_k_models) == [
        checkpoint.best_model_path
    ]
    loaded = Net.load_from_checkpoint(checkpoint.best_model_path)
    if monitor is None:  # the newest: the fit's final weights
        assert torch.equal(loaded.layer.weight, trainer.module.layer.weight)


def test_a_validation_metric_before_the_first_validation_waits_for_it(tmp_path: Path) -> None:
    # Lightning's common ModelCheckpoint(monitor="val_loss", every_n_train_steps=N): as Lightning
    # 2.6.6, the saves before the first validation run wait for one, silently; here validation runs
    # at the epoch's end, where these checkpoints are not saved, so steps 2 and 4 write nothing
    # (`last` neither); the later ones rank.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "c", monitor="val_loss", every_n_train_steps=2, save_top_k=2, save_last=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(tmp_path, checkpoint, 2)
    assert _names(tmp_path / "c") == ["epoch=1-step=6", "epoch=1-step=8", "last"]
    # Once validation has run in the fit, a name never logged is an error, as before.
    typo = ModelCheckpoint(dirpath=tmp_path / "t", monitor="val_los", every_n_train_steps=2)
    with pytest.raises(KeyError, match=r"could not find 'val_los'"):
        _fit(tmp_path, typo, 2)


class _Flaky(Net):
    fail = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail and self.trainer.global_step == 6:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_ckpt_path_last_takes_the_newest_of_last_and_the_on_exception_checkpoint(tmp_path: Path) -> None:
    # Lightning's ckpt_path="last" looks at the OnExceptionCheckpoint too: the failure's checkpoint
    # (step 6) is newer than `last` (step 4), so the fit resumes from it.
    def trainer(*callbacks: Any) -> Trainer:
        return Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                       logger=False, max_epochs=3, callbacks=list(callbacks))  # fmt: skip

    crash = OnExceptionCheckpoint(tmp_path / "x")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(ModelCheckpoint(dirpath=tmp_path / "c", save_last=True), crash).fit(_Flaky(), _loader())
    steps: list[int] = []
    record = LambdaCallback(on_train_batch_start=lambda t, *_: steps.append(t.global_step))
    module = _Flaky()
    module.fail = False
    again = OnExceptionCheckpoint(tmp_path / "x")  # a new process: it finds the failure's checkpoint
    trainer(ModelCheckpoint(dirpath=tmp_path / "c", save_last=True), again, record).fit(
        module, _loader(), ckpt_path="last"
    )
    assert steps[0] == 6 and len(steps) == 6
    # Without a ModelCheckpoint, "last" is the OnExceptionCheckpoint's.
    steps.clear()
    without = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      logger=False, max_epochs=3, enable_checkpointing=False, callbacks=[again, record])  # fmt: skip
    without.fit(module, _loader(), ckpt_path="last")
    assert steps[0] == 6


def test_save_last_saves_at_the_end_when_nothing_was_due(tmp_path: Path) -> None:
    # Lightning 2.6 (on_train_end): save_last=True always leaves a `last`, here from the end of the fit.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "c", every_n_epochs=3, save_last=True)
    trainer = _fit(tmp_path, checkpoint, 2)
    assert _names(tmp_path / "c") == ["last"] and checkpoint.last_model_path == str(tmp_path / "c" / "last")
    assert torch.equal(
        Net.load_from_checkpoint(tmp_path / "c" / "last").layer.weight, trainer.module.layer.weight
    )
    steps: list[int] = []
    record = LambdaCallback(on_train_batch_start=lambda t, *_: steps.append(t.global_step))
    again = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                    logger=False, max_epochs=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "c"), record])  # fmt: skip
    again.fit(Net(), _loader(), _loader(), ckpt_path="last")
    assert steps == [8, 9, 10, 11]


def test_dirpath_expands_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    checkpoint = ModelCheckpoint(dirpath="~/checkpoints")  # as Lightning: not ./~/checkpoints
    assert checkpoint.dirpath == str(tmp_path / "home" / "checkpoints")
    _fit(tmp_path, checkpoint, 1)
    assert _names(tmp_path / "home" / "checkpoints") == ["epoch=0-step=4"] and not (tmp_path / "~").exists()


def test_lightnings_name_class_attributes(tmp_path: Path) -> None:
    class Underscored(ModelCheckpoint):
        CHECKPOINT_EQUALS_CHAR = "_"  # Lightning's: "epoch_0-step_4"

    checkpoint = Underscored(dirpath=tmp_path / "c", save_top_k=-1)
    _fit(tmp_path, checkpoint, 1)
    assert _names(tmp_path / "c") == ["epoch_0-step_4"]
    for attribute, value in (
        ("CHECKPOINT_JOIN_CHAR", "_"),
        ("STARTING_VERSION", 0),
        ("CHECKPOINT_EQUALS_CHAR", "/"),
    ):
        odd = ModelCheckpoint(dirpath=tmp_path / "odd")
        setattr(odd, attribute, value)
        with pytest.raises(ValueError, match=rf"ModelCheckpoint.{attribute}={value!r}"):
            _fit(tmp_path, odd, 1)


def _two_rank_worker(root: str) -> list[list[str]]:
    fixed = ModelCheckpoint(dirpath=Path(root) / "fixed", filename="{epoch}", every_n_train_steps=1)
    at_end = ModelCheckpoint(dirpath=Path(root) / "end", every_n_epochs=3, save_last=True)
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=[fixed, at_end], strategy="ddp", max_epochs=2)  # fmt: skip
    trainer.fit(Net(), _loader())
    return [_names(Path(root) / "fixed"), _names(Path(root) / "end")]


def test_written_over_and_saved_at_the_end_on_two_processes(tmp_path: Path) -> None:
    assert run_processes(_two_rank_worker, str(tmp_path)) == [[["epoch=1"], ["last"]]] * 2


def test_zero_turns_a_trigger_off_as_in_lightning() -> None:
    from ember.callbacks import ModelCheckpoint

    steps = ModelCheckpoint(every_n_train_steps=5, every_n_epochs=0)  # 0 is no second trigger
    assert (steps.every_n_train_steps, steps.every_n_epochs) == (5, None)
    epochs = ModelCheckpoint(every_n_train_steps=0, every_n_epochs=2)
    assert (epochs.every_n_train_steps, epochs.every_n_epochs) == (None, 2)
    nothing = ModelCheckpoint(every_n_train_steps=0)  # a trigger given, and off: none is on
    assert (nothing.every_n_train_steps, nothing.every_n_epochs) == (None, None)
    assert ModelCheckpoint().every_n_epochs == 1
    with pytest.raises(ValueError, match=r"every_n_epochs=-1\) must be None, 0 \(off\) or an int >= 1"):
        ModelCheckpoint(every_n_epochs=-1)
    with pytest.raises(ValueError, match="are exclusive"):
        ModelCheckpoint(every_n_train_steps=2, every_n_epochs=1)
