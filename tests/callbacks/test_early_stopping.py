"""EarlyStopping against Lightning 2.6.6 (values found by running the same fits with Lightning):
why it stopped (``stopping_reason``, ``stopping_reason_message``), patience counted in validation
runs, verbose messages, ``strict=False``, ``log_rank_zero_only`` and its state across a resume."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_loader

from ember import TrainModule
from ember.callbacks import EarlyStopping, EarlyStoppingReason


class Scripted(TrainModule):
    """Logs ``val_loss`` from a script: the n-th validation run of the fit logs ``values[n]``."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.values, self.runs = values, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(self.values[min(self.runs, len(self.values) - 1)]))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.runs += 1

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, stopper: EarlyStopping, values: list[float], **kwargs: Any) -> Any:
    trainer = quiet_trainer(root, [stopper], **{"max_epochs": 20, "num_sanity_val_steps": 0, **kwargs})
    trainer.fit(Scripted(values), regression_loader(), regression_loader())
    return trainer


def test_patience_stop_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=2, verbose=True)
    trainer = _fit(tmp_path, stopper, [3.0, 2.0, 2.5, 2.4, 1.0])
    # Lightning 2.6.6: current_epoch 4, wait_count 2, stopped_epoch 3, PATIENCE_EXHAUSTED.
    assert (trainer.current_epoch, stopper.wait_count, stopper.stopped_epoch) == (4, 2, 3)
    assert stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert (
        stopper.stopping_reason_message is not None
        and "did not improve in 2" in stopper.stopping_reason_message
    )
    assert stopper.stop_reason == stopper.stopping_reason_message  # (ember's earlier name)
    out = capsys.readouterr().out
    # As Lightning's verbose: each improvement is reported too (the first without a difference).
    assert "val_loss improved: best 3.000" in out and "val_loss improved by 1.000" in out
    assert stopper.state_dict()["stopping_reason"] == 3


@pytest.mark.parametrize(
    ("kwargs", "values", "reason", "epoch"),
    [
        ({"stopping_threshold": 2.0}, [3.0, 1.5], EarlyStoppingReason.STOPPING_THRESHOLD, 1),
        ({"divergence_threshold": 5.0}, [3.0, 6.0], EarlyStoppingReason.DIVERGENCE_THRESHOLD, 1),
        ({}, [3.0, float("inf")], EarlyStoppingReason.NON_FINITE_METRIC, 1),
    ],
)
def test_thresholds_and_non_finite_values_name_their_reason(
    tmp_path: Path, kwargs: dict[str, Any], values: list[float], reason: EarlyStoppingReason, epoch: int
) -> None:
    stopper = EarlyStopping(monitor="val_loss", **kwargs)
    _fit(tmp_path, stopper, values)
    assert (stopper.stopping_reason, stopper.stopped_epoch) == (reason, epoch)


@pytest.mark.parametrize(
    ("kwargs", "values", "stopped_epoch", "best"),
    [  # Lightning 2.6.6 compares the float32 values in float32: 0.35 reaches a threshold of 0.35
        ({"stopping_threshold": 0.35}, [0.5, 0.4, 0.35, 0.3], 3, 0.35),
        ({"min_delta": 0.05, "patience": 1}, [0.5, 0.45, 0.45], 1, 0.5),
        ({"mode": "max", "stopping_threshold": 0.3}, [0.1, 0.2, 0.3, 0.4], 3, 0.3),
    ],
    ids=["stopping_threshold", "min_delta", "max"],
)
def test_float32_values_are_compared_as_lightning_compares_them(
    tmp_path: Path, kwargs: dict[str, Any], values: list[float], stopped_epoch: int, best: float
) -> None:
    stopper = EarlyStopping(monitor="val_loss", **kwargs)
    _fit(tmp_path, stopper, values)  # (Scripted logs each value as a float32 tensor)
    assert stopper.stopped_epoch == stopped_epoch
    assert stopper.best_score == float(torch.tensor(best))


def test_a_fit_that_never_stops_has_no_reason(tmp_path: Path) -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=5)
    _fit(tmp_path, stopper, [3.0, 2.0, 1.0], max_epochs=3)
    assert stopper.stopping_reason is EarlyStoppingReason.NOT_STOPPED
    assert stopper.stopping_reason_message is None and stopper.stop_reason == ""


def test_patience_counts_validation_runs_not_epochs(tmp_path: Path) -> None:
    # As Lightning 2.6.6: validation every 3rd epoch, patience 2: checks at epochs 2, 5, 8; stops at 8.
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    trainer = _fit(tmp_path, stopper, [3.0], check_val_every_n_epoch=3)
    assert (trainer.current_epoch, stopper.wait_count, stopper.stopped_epoch) == (9, 2, 8)


def test_strict_false_skips_a_missing_monitor_and_verbose_warns(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, EarlyStopping(monitor="nope", strict=False, verbose=True), [1.0], max_epochs=1)
        _fit(tmp_path, EarlyStopping(monitor="nope", strict=False), [1.0], max_epochs=1)
    found = [w for w in caught if "'nope'" in str(w.message)]
    assert len(found) == 1 and found[0].category is RuntimeWarning and "strict=False" in str(found[0].message)


def test_log_rank_zero_only_is_checked() -> None:
    assert EarlyStopping(monitor="val_loss", log_rank_zero_only=True).log_rank_zero_only
    with pytest.raises((TypeError, ValueError), match="log_rank_zero_only"):
        EarlyStopping(monitor="val_loss", log_rank_zero_only="yes")  # type: ignore[arg-type]


def test_the_reason_survives_a_resume(tmp_path: Path) -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=1)
    _fit(tmp_path, stopper, [3.0, 4.0])
    state = stopper.state_dict()
    again = EarlyStopping(monitor="val_loss", patience=1)
    again.load_state_dict(state)
    assert again.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert again.stopping_reason_message == stopper.stopping_reason_message
    assert (again.wait_count, again.stopped_epoch, again.best_score) == (1, 1, 3.0)
    # A checkpoint of an earlier ember (no reason saved) loads as "not stopped".
    old = {k: v for k, v in state.items() if not k.startswith("stopping_reason")}
    fresh = EarlyStopping(monitor="val_loss")
    fresh.load_state_dict(old)
    assert fresh.stopping_reason is EarlyStoppingReason.NOT_STOPPED and fresh.stopping_reason_message is None


class RankScripted(Scripted):
    """Rank 1's value diverges in the second validation run; rank 0's keeps improving."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        diverged = self.trainer.global_rank == 1 and self.runs >= 1
        self.log("val_loss", torch.tensor(9.0 if diverged else 3.0 - self.runs))


def _two_rank_worker(root: str, rank_zero_only: bool) -> tuple[int, str, str | None, int, list[str]]:
    stopper = EarlyStopping(
        monitor="val_loss", divergence_threshold=5.0, verbose=True, log_rank_zero_only=rank_zero_only
    )
    trainer = quiet_trainer(Path(root), [stopper], max_epochs=5, num_sanity_val_steps=0, strategy="ddp")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.fit(RankScripted([]), regression_loader(), regression_loader())
    lines = [line for line in out.getvalue().splitlines() if "EarlyStopping" in line]
    return (
        stopper.stopped_epoch,
        stopper.stopping_reason.name,
        stopper.stopping_reason_message,
        trainer.global_rank,
        lines,
    )


def test_on_two_processes_every_process_knows_why_and_says_it_with_its_rank(tmp_path: Path) -> None:
    zero, one = run_processes(_two_rank_worker, str(tmp_path / "all"), False)
    assert list(zero[:2]) == list(one[:2]) == [1, "DIVERGENCE_THRESHOLD"]
    assert zero[2] == "another process asked to stop (DIVERGENCE_THRESHOLD)"
    assert one[2] is not None and "divergence_threshold=5.0" in one[2]
    assert all(line.startswith("[rank: 0] EarlyStopping: ") for line in zero[4]) and zero[4]
    assert any("divergence_threshold" in line for line in one[4]) and one[4][0].startswith("[rank: 1] ")
    zero, one = run_processes(_two_rank_worker, str(tmp_path / "zero"), True)
    assert zero[4] and one[4] == []  # log_rank_zero_only: rank 1 says nothing
