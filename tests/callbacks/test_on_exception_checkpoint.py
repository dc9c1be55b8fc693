"""OnExceptionCheckpoint: a fit that raises mid-epoch leaves a checkpoint from which a resumed fit
ends where an uninterrupted one does (bit for bit), on one process and on two; an existing path is
never overwritten; when only one of two processes raises, nothing is saved and nothing hangs."""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import TrainModule
from ember.callbacks import OnExceptionCheckpoint
from ember.trainer.preemption import Preempted


class Net(TrainModule):
    """Raises ``failure`` in the training step of the ``fail_at``-th batch (counted over epochs) on
    the processes ``fail_ranks``."""

    def __init__(self, fail_at: int | None = None, fail_ranks: tuple[int, ...] = (0, 1)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fail_at, self.fail_ranks = fail_at, fail_ranks
        self.failure: BaseException = RuntimeError("boom")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        trainer = self.trainer
        if trainer.total_batch_idx == self.fail_at and trainer.global_rank in self.fail_ranks:
            raise self.failure
        loss = F.mse_loss(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _weights(module: Net) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in module.parameters()]


def test_a_fit_that_raises_mid_epoch_resumes_from_the_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    whole = Net()
    quiet_trainer(tmp_path, [], max_epochs=3).fit(whole, regression_loader())
    callback = OnExceptionCheckpoint(tmp_path / "ckpt")
    failed = Net(fail_at=6)  # epoch 1, batch 2 (4 batches an epoch)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(failed, regression_loader())
    assert callback.ckpt_path == str(tmp_path / "ckpt" / "on_exception")
    assert (tmp_path / "ckpt" / "on_exception" / "manifest.json").is_file()
    resumed = Net()
    trainer = quiet_trainer(tmp_path, [OnExceptionCheckpoint(tmp_path / "ckpt")], max_epochs=3)
    trainer.fit(resumed, regression_loader(), ckpt_path=callback.ckpt_path)
    assert trainer.global_step == 12
    assert _weights(resumed) == _weights(whole)  # the failed batch ran again, and only it


def test_an_existing_path_is_never_overwritten(tmp_path: Path) -> None:
    mine = tmp_path / "ckpt" / "on_exception"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    callback = OnExceptionCheckpoint(tmp_path / "ckpt")
    for expected in ("on_exception-v1", "on_exception-v2"):
        with pytest.raises(RuntimeError, match="boom"):
            quiet_trainer(tmp_path, [callback], max_epochs=1).fit(Net(fail_at=1), regression_loader())
        assert callback.ckpt_path == str(tmp_path / "ckpt" / expected)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "on_exception",
        "on_exception-v1",
        "on_exception-v2",
    ]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_what_is_saved_and_what_is_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(failure: BaseException, directory: str) -> OnExceptionCheckpoint:
        module, callback = Net(fail_at=1), OnExceptionCheckpoint(tmp_path / directory, filename="crash")
        module.failure = failure
        with pytest.raises(type(failure)):
            quiet_trainer(tmp_path, [callback], max_epochs=1).fit(module, regression_loader())
        return callback

    fail(KeyboardInterrupt(), "interrupted")
    assert (tmp_path / "interrupted" / "crash" / "manifest.json").is_file()
    assert "ember: the fit raised KeyboardInterrupt; OnExceptionCheckpoint saved" in capsys.readouterr().err
    # A pre-emption saved `last` already: no second copy; without a ModelCheckpoint it saved none.
    fail(Preempted(signal.SIGTERM, tmp_path / "last", 1), "preempted")
    assert not (tmp_path / "preempted").exists()
    fail(Preempted(signal.SIGTERM, None, 1), "preempted")
    assert (tmp_path / "preempted" / "crash").is_dir()
    # Only fit saves: validate, test and predict have no training to resume.
    module, callback = Net(), OnExceptionCheckpoint(tmp_path / "validate")
    module.validation_step = lambda batch, batch_idx: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        quiet_trainer(tmp_path, [callback]).validate(module, regression_loader(), verbose=False)
    assert not (tmp_path / "validate").exists()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"dirpath": None}, TypeError, r"OnExceptionCheckpoint\(dirpath=None\) must be a path"),
        ({"dirpath": "d", "filename": 3}, TypeError, r"filename=3\) must be a string"),
        ({"dirpath": "d", "filename": ""}, ValueError, r"filename=''\) must be a name"),
        ({"dirpath": "d", "filename": "a/b"}, ValueError, r"filename='a/b'\) must be a name"),
    ],
)
def test_bad_arguments(arguments: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        OnExceptionCheckpoint(**arguments)


def _fit_worker(root: str, fail_ranks: list[int], collective_timeout: float | None) -> dict[str, Any]:
    """An uninterrupted fit; a fit that raises on ``fail_ranks`` at batch 3; a fit resumed from what
    the failure saved (when it saved). ``collective_timeout=None``: no watchdog."""
    directory = Path(root)
    whole = Net()
    quiet_trainer(directory / "whole", [], strategy="ddp", max_epochs=2).fit(whole, regression_loader(2))
    callback = OnExceptionCheckpoint(directory / "ckpt")
    callback.agree_seconds = 3.0
    trainer = quiet_trainer(
        directory / "failed", [callback], strategy="ddp", max_epochs=2, collective_timeout=collective_timeout
    )
    started, failure = time.monotonic(), ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(Net(fail_at=3, fail_ranks=tuple(fail_ranks)), regression_loader(2))
        except Exception as error:  # (the raising rank's RuntimeError; the other's broken collective)
            failure = f"{type(error).__name__}: {error}"
    result: dict[str, Any] = {
        "failure": failure,
        "seconds": time.monotonic() - started,
        "warnings": [str(w.message) for w in caught if "OnExceptionCheckpoint" in str(w.message)],
        "saved": Path(callback.ckpt_path).is_dir(),
    }
    if result["saved"]:
        resumed = Net()
        trainer = quiet_trainer(directory / "resumed", [], strategy="ddp", max_epochs=2)
        trainer.fit(resumed, regression_loader(2), ckpt_path=callback.ckpt_path)
        result["same_as_whole"] = _weights(resumed) == _weights(whole)
        result["global_step"] = trainer.global_step
    return result


def test_two_processes_that_both_raise_save_and_resume(tmp_path: Path) -> None:
    results = run_processes(_fit_worker, str(tmp_path), [0, 1], 60)
    for rank, result in enumerate(results):
        assert result["failure"] == "RuntimeError: boom", rank
        assert result["saved"] and result["same_as_whole"] and result["global_step"] == 8, result


def test_when_one_process_raises_alone_nothing_is_saved_and_nothing_hangs(tmp_path: Path) -> None:
    # Rank 1 fails in its training step while rank 0 waits for it in the step's gradient all-reduce:
    # rank 1 waits agree_seconds for rank 0 to fail at the same point, gives up, and ends; rank 0's
    # all-reduce then breaks, and it finds rank 1's decision: no save. (Here without the watchdog:
    # the processes agree through the store all the same.)
    started = time.monotonic()
    zero, one = run_processes(_fit_worker, str(tmp_path), [1], None, timeout=120)
    assert one["failure"] == "RuntimeError: boom"
    assert zero["failure"] != one["failure"]  # the collective rank 1 left
    assert one["seconds"] < 30  # it waited agree_seconds (3 s) for rank 0, not longer
    for result in (zero, one):
        assert not result["saved"], result
        assert any("not every process did, so no checkpoint is saved" in w for w in result["warnings"]), (
            result
        )
    assert not (tmp_path / "ckpt").exists()
    assert time.monotonic() - started < 90
