"""``ThroughputMonitor`` against Lightning 2.6's: the keys, stages and steps of its rows in a real fit
(the expected rows are what Lightning's callback logged for the same data and Trainer arguments),
and its rates from a fake clock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from logger_fits import RowLogger
from small_fit import LinearRegression
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer
from ember.callbacks import ThroughputMonitor

_COUNTS = ("batches", "samples", "lengths", "epoch")


class Rows(RowLogger):
    def row(self, metrics: dict[str, float]) -> dict[str, Any]:
        # Counts as they are; times and rates only by name (they depend on the machine).
        row = {
            k: (v if k.endswith(_COUNTS) else "x")
            for k, v in metrics.items()
            if k.startswith(("train", "validate", "test", "epoch"))
        }
        return row if any(k != "epoch" for k in row) else {}


class Net(LinearRegression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def test_step(self, batch: Any, batch_idx: int) -> None:
        pass


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)), batch_size=4
    )


def _train(batches: int, epoch: int) -> dict[str, Any]:
    return {"train/time": "x", "train/batches": batches, "train/samples": 4 * batches,
            "train/device/batches_per_sec": "x", "train/device/samples_per_sec": "x", "epoch": epoch}  # fmt: skip


def _evaluated(stage: str, batches: int) -> dict[str, Any]:
    return {f"{stage}/time": "x", f"{stage}/batches": batches, f"{stage}/samples": 4 * batches,
            f"{stage}/device/batches_per_sec": "x", f"{stage}/device/samples_per_sec": "x"}  # fmt: skip


def test_rows_of_a_fit_and_a_test_as_lightnings(tmp_path: Path) -> None:
    rows = Rows()
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0], window_size=2)
    trainer = Trainer(max_epochs=2, logger=rows, log_every_n_steps=2, callbacks=[monitor], num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Net(), _loader(), _loader())
    validation = [(2, _evaluated("validate", 2)), (4, _evaluated("validate", 4))]
    # Training rows: the step of the Trainer's row for the batch (Lightning's + 1).
    assert rows.rows == [
        (2, _train(2, 0)), (4, _train(4, 0)), *validation,
        (6, _train(6, 1)), (8, _train(8, 1)), *validation,
    ]  # fmt: skip
    rows.rows.clear()
    trainer.test(Net(), _loader(), verbose=False)
    assert rows.rows == [(2, _evaluated("test", 2)), (4, _evaluated("test", 4))]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_over_the_window_and_validation_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)

    class Timed(Net):
        flops_per_batch = 100

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            clock.now += 0.5  # each training batch takes 0.5 s
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            clock.now += 10.0  # validation: never counted in the training rates

    rows = Rows()
    monitor = ThroughputMonitor(
        batch_size_fn=lambda b: b[0].shape[0], length_fn=lambda b: b[0].numel(), window_size=3
    )
    trainer = Trainer(max_epochs=2, logger=rows, log_every_n_steps=4, callbacks=[monitor], num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    captured: list[dict[str, float]] = []
    monkeypatch.setattr(trainer, "log_metrics", lambda metrics, step=None: captured.append(dict(metrics)))
    trainer.fit(Timed(), _loader(), _loader())
    second_epoch = next(m for m in captured if m.get("train/batches") == 8)
    # The last 3 updates (batches 6-8) span 2 batches in 1 s: validation's 40 s are left out.
    assert second_epoch["train/time"] == pytest.approx(4.0)
    assert second_epoch["train/device/batches_per_sec"] == pytest.approx(2.0)
    assert second_epoch["train/device/samples_per_sec"] == pytest.approx(8.0)
    assert second_epoch["train/lengths"] == 8 * 12 and second_epoch[
        "train/device/items_per_sec"
    ] == pytest.approx(24.0)
    assert second_epoch["train/device/flops_per_sec"] == pytest.approx(200.0)
    assert "train/samples_per_sec" not in second_epoch  # the job's rates only on several processes


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"ThroughputMonitor\(window_size=1\).*>= 2"):
        ThroughputMonitor(batch_size_fn=len, window_size=1)
    with pytest.raises(TypeError, match=r"ThroughputMonitor\(separator=3\)"):
        ThroughputMonitor(batch_size_fn=len, separator=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch_size_fn"):
        ThroughputMonitor(batch_size_fn=3)  # type: ignore[arg-type]
