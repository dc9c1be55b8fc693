"""DeviceStatsMonitor: the CPU statistics reach the CSV logger's metrics.csv under Lightning's keys,
at the batches whose rows the Trainer writes; /proc gives what psutil gives; CUDA's keys are
torch.cuda.memory_stats'; no logger is refused."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import regression_loader
from torch import nn

import ember.callbacks.device_stats_monitor as device_stats_monitor
from ember import Trainer, TrainModule
from ember.callbacks import DeviceStatsMonitor
from ember.trainer.loggers import CSVLogger

_CPU_KEYS = ("cpu_percent", "cpu_swap_percent", "cpu_vm_percent")


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, monitor: DeviceStatsMonitor) -> list[dict[str, str]]:
    logger = CSVLogger(root)
    trainer = Trainer(default_root_dir=str(root), logger=logger, callbacks=[monitor], max_epochs=1,
                      log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    trainer.fit(Net(), regression_loader(), regression_loader())
    with open(logger.metrics_file, newline="") as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict[str, str]], hook: str) -> list[tuple[int, dict[str, float]]]:
    """(step, CPU statistics) of each row that holds ``hook``'s."""
    prefix = f"DeviceStatsMonitor.{hook}/"
    return [
        (int(row["step"]), {key: float(row[prefix + key]) for key in _CPU_KEYS})
        for row in rows
        if row.get(prefix + "cpu_percent")
    ]


def test_cpu_statistics_reach_the_csv_logger_at_the_logged_batches(tmp_path: Path) -> None:
    rows = _fit(tmp_path, DeviceStatsMonitor())
    expected_steps = {  # 4 batches, a row every 2: batches 1 and 3 (steps 1 and 3 before, 2 and 4 after)
        "on_train_batch_start": [1, 3],
        "on_train_batch_end": [2, 4],
        "on_validation_batch_start": [4, 4],  # validation batches 1 and 3, after the last step
        "on_validation_batch_end": [4, 4],
    }
    for hook, steps in expected_steps.items():
        logged = _logged(rows, hook)
        assert [step for step, _ in logged] == steps, hook
        for _, stats in logged:
            assert all(0.0 <= value <= 100.0 for value in stats.values()), stats
        assert any(stats["cpu_vm_percent"] > 0 for _, stats in logged)
    columns = set(rows[0])
    assert not any(c.startswith("DeviceStatsMonitor.on_test") for c in columns)
    # cpu_stats=False on the CPU: nothing to log.
    rows = _fit(tmp_path / "off", DeviceStatsMonitor(cpu_stats=False))
    assert not any(c.startswith("DeviceStatsMonitor") for c in rows[0])


def test_without_psutil_the_statistics_come_from_proc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    psutil = pytest.importorskip("psutil")
    if not Path("/proc/meminfo").is_file():
        pytest.skip("/proc is Linux's")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
        reader = device_stats_monitor._CPUStats()
        assert reader._psutil is None
        sum(i * i for i in range(2_000_000))  # some CPU time to measure (~0.1 s)
        stats = reader.read()
        with pytest.raises(
            ModuleNotFoundError, match=r"pip install psutil, or DeviceStatsMonitor\(cpu_stats=False\)"
        ):
            device_stats_monitor._CPUStats(proc=tmp_path)  # neither psutil nor /proc
        rows = _fit(tmp_path / "fit", DeviceStatsMonitor())  # the fit reads /proc too
        assert len(_logged(rows, "on_train_batch_end")) == 2
    assert abs(stats["cpu_vm_percent"] - psutil.virtual_memory().percent) < 5
    assert abs(stats["cpu_swap_percent"] - psutil.swap_memory().percent) < 5
    assert 0.0 < stats["cpu_percent"] <= 100.0


def test_cuda_statistics_are_torch_cuda_memory_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda", 0)
    if not torch.cuda.is_available():  # the routing, with torch's function answering for a GPU
        fake = {"allocated_bytes.all.current": 512, "num_ooms": 0, "active_bytes.large_pool.peak": 1024}
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: fake if d == device else {})
        assert device_stats_monitor._device_stats(device) == {key: float(v) for key, v in fake.items()}
        return
    torch.ones(1024, device=device)
    stats = device_stats_monitor._device_stats(device)
    assert stats["allocated_bytes.all.peak"] >= 4096 and "num_ooms" in stats
    assert device_stats_monitor._device_stats(torch.device("cpu")) == {}


def test_a_trainer_without_logger_is_refused(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=str(tmp_path), logger=False, callbacks=[DeviceStatsMonitor()],
                      enable_progress_bar=False, enable_model_summary=False, max_epochs=1)  # fmt: skip
    with pytest.raises(
        RuntimeError, match="DeviceStatsMonitor logs through the Trainer's loggers, and it has none"
    ):
        trainer.fit(Net(), regression_loader())
    with pytest.raises(TypeError, match=r"DeviceStatsMonitor\(cpu_stats=1\) must be True or False or None"):
        DeviceStatsMonitor(cpu_stats=1)  # type: ignore[arg-type]
