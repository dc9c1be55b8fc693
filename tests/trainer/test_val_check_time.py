"""A time-based ``val_check_interval`` (Lightning 2.6): validate every N seconds of training.

The clock is a fake one put in the Trainer's private ``_val_clock._now``: each training batch moves
it 1 s forward, each validation batch 10 s (time that must not count)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import ModelCheckpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(TrainModule):
    """Records ``total_batch_idx`` at each validation of the fit; moves ``clock`` as it runs."""

    def __init__(self, clock: FakeClock, train_seconds: float = 1.0, stop_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.clock, self.train_seconds, self.stop_at = clock, train_seconds, stop_at
        self.validated_at: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.clock.now += self.train_seconds
        if self.trainer.state.total_batch_idx + 1 == self.stop_at:
            self.trainer.should_stop = True
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.clock.now += 10.0
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.trainer.state.total_batch_idx)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(batches * 2, 3, generator=g), torch.randn(batches * 2, 1, generator=g)),
                      batch_size=2)  # fmt: skip


def _fit(
    tmp_path: Path, module: Timed, batches: int = 8, ckpt_path: str | None = None, **kwargs: Any
) -> Trainer:
    trainer = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      logger=False, enable_checkpointing=False, **kwargs)  # fmt: skip
    assert trainer._val_clock is not None
    trainer._val_clock._now = module.clock
    trainer.fit(module, _loader(batches), _loader(2), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("00:00:00:03", timedelta(seconds=3)),
        ({"minutes": 1, "seconds": 30}, timedelta(seconds=90)),
        (timedelta(milliseconds=2500), timedelta(seconds=2.5)),
        (timedelta(0), timedelta(0)),
    ],
)
def test_the_forms_of_a_time(interval: Any, expected: timedelta) -> None:
    # check_val_every_n_epoch=None takes a time too (Lightning: no alignment to epochs then)
    trainer = Trainer(val_check_interval=interval, check_val_every_n_epoch=None, logger=False, max_epochs=1)
    assert trainer.val_check_interval == expected


@pytest.mark.parametrize(
    ("interval", "shown"),
    [
        ("1:30", r"'1:30'"),
        ("00:00:-1:00", r"'00:00:-1:00'"),
        (timedelta(seconds=-1), r"datetime\.timedelta\(days=-1, seconds=86399\)"),
        ({"minuts": 3}, r"\{'minuts': 3\}"),
        ([1, 2], r"\[1, 2\]"),
        (0, "0"),
    ],
)
def test_a_bad_interval_names_the_argument_and_the_forms(interval: Any, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"val_check_interval={shown} must be an int >= 1 .*a float in "
                       r"\(0\.0, 1\.0\] .*'DD:HH:MM:SS', a datetime\.timedelta, or a dict"):  # fmt: skip
        Trainer(val_check_interval=interval)


def test_validation_runs_once_the_interval_of_training_time_passed(tmp_path: Path) -> None:
    # 1 s a training batch, 2.5 s: after every 3rd batch since the fit's start or the last
    # validation's end (its 10 s a batch, and the sanity check's, do not count); an epoch's end
    # (8 batches) validates only when due, as Lightning's.
    module = Timed(FakeClock())
    _fit(tmp_path, module, max_epochs=2, val_check_interval=timedelta(seconds=2.5))
    assert module.validated_at == [3, 6, 9, 12, 15]
    module = Timed(FakeClock())  # due at the last batch: the epoch-end validation, once
    _fit(tmp_path, module, batches=4, max_epochs=2, val_check_interval=timedelta(seconds=2))
    assert module.validated_at == [2, 4, 6, 8]


def test_only_epochs_that_validate_check_the_clock(tmp_path: Path) -> None:
    # check_val_every_n_epoch=2: the time passed in epoch 0 makes epoch 1 validate after its first
    # batch (Lightning's alignment); limit_val_batches=0: never.
    module = Timed(FakeClock())
    _fit(
        tmp_path, module, batches=4, max_epochs=3, val_check_interval="00:00:00:02", check_val_every_n_epoch=2
    )
    assert module.validated_at == [5, 7]
    module = Timed(FakeClock())
    _fit(tmp_path, module, batches=4, max_epochs=1, val_check_interval="00:00:00:01", limit_val_batches=0)
    assert module.validated_at == []


@pytest.mark.parametrize(("stop_at", "expected"), [(3, [3]), (2, [2])])
def test_a_stop_request_validates_once(tmp_path: Path, stop_at: int, expected: list[int]) -> None:
    # should_stop after batch 3 (validation due) or 2 (not due): one validation, after that batch
    module = Timed(FakeClock(), stop_at=stop_at)
    _fit(tmp_path, module, max_epochs=2, val_check_interval=timedelta(seconds=2.5))
    assert module.validated_at == expected


def test_checkpoints_follow_the_validations_and_a_resume_restarts_the_clock(tmp_path: Path) -> None:
    # ModelCheckpoint saves after each validation (not at the epoch's end), as with Lightning's
    # time-based interval. The clock is not in the checkpoint: the resumed fit counts from its start.
    module = Timed(FakeClock())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, save_last=True)
    trainer = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      logger=False, callbacks=[checkpoint], max_epochs=1,
                      val_check_interval=timedelta(seconds=2.5))  # fmt: skip
    assert trainer._val_clock is not None
    trainer._val_clock._now = module.clock
    trainer.fit(module, _loader(8), _loader(2))
    assert module.validated_at == [3, 6]
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name != "last")
    assert saved == ["epoch=0-step=3", "epoch=0-step=6"]
    resumed = Timed(FakeClock())  # "last" is the validation's at batch 6: 7 and 8, then epoch 1
    _fit(tmp_path / "resumed", resumed, max_epochs=2, val_check_interval=timedelta(seconds=2.5),
         ckpt_path=str(tmp_path / "ckpt" / "last"))  # fmt: skip
    assert resumed.validated_at == [9, 12, 15]


def test_fast_dev_run_ignores_the_time() -> None:
    trainer = Trainer(fast_dev_run=True, val_check_interval="00:00:00:01", logger=False, max_epochs=1)
    assert trainer._val_clock is None and trainer.val_check_interval == 1.0


def _ranks_worker(root: str) -> list[int]:
    """Rank 0's clock makes validation due after every 3rd batch; rank 1's after every batch."""
    import torch

    from ember import Trainer

    rank = int(__import__("os").environ["RANK"])
    module = Timed(FakeClock(), train_seconds=1.0 if rank == 0 else 100.0)
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      logger=False, enable_checkpointing=False, max_epochs=1, num_sanity_val_steps=0, val_check_interval=timedelta(seconds=2.5))  # fmt: skip
    assert trainer._val_clock is not None
    trainer._val_clock._now = module.clock
    torch.manual_seed(0)
    trainer.fit(module, _loader(16), _loader(4))
    return module.validated_at


def test_every_rank_validates_at_rank_zeros_time(tmp_path: Path) -> None:
    ranks = run_processes(_ranks_worker, str(tmp_path), nprocs=2, timeout=120)
    assert ranks == [[3, 6], [3, 6]]  # 8 batches a rank: rank 0's clock decides for both
