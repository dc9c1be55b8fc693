"""Lightning's logging idioms, checked against what Lightning 2.6 does: ``self.log``'s
``enable_graph`` and ``sync_dist_group`` (on 2 real processes), and ``LearningRateMonitor`` with
``logging_interval=None`` following each scheduler's interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from logger_fits import RowLogger
from small_fit import random_loader as _loader
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback, LearningRateMonitor


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)  # fmt: skip
    return Trainer(**{**settings, **kwargs})


class Net(TrainModule):
    def __init__(self, interval: str | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.interval = interval  # the StepLR's, None: no scheduler
        self.seen: dict[str, bool] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.interval is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


# -- self.log(enable_graph=..., sync_dist_group=...) ---------------------------------------------------
def test_log_accepts_enable_graph_and_sync_dist_group(tmp_path: Path) -> None:
    class Logs(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("kept", loss, enable_graph=True)
            self.log("kept_epoch", loss, enable_graph=True, on_step=False, on_epoch=True)
            self.log("group_without_sync", loss, sync_dist_group=object())  # ignored without sync_dist
            self.log("synced", loss, sync_dist=True, sync_dist_group=None)
            metrics = self.trainer.callback_metrics
            self.seen = {k: metrics[k].requires_grad for k in ("kept", "group_without_sync", "synced")}
            return loss

    module = Logs()
    trainer = _trainer(tmp_path)
    trainer.fit(module, _loader())
    # Lightning 2.6 records the values without their graph, enable_graph or not.
    assert module.seen == {"kept": False, "group_without_sync": False, "synced": False}
    assert not trainer.callback_metrics["kept_epoch"].requires_grad
    assert set(trainer.callback_metrics) == {"kept", "kept_epoch", "group_without_sync", "synced"}


def _group_worker(root: str) -> dict[str, float]:
    import torch.distributed as dist

    class Grouped(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            # Every process creates every group, in the same order (torch.distributed's rule).
            self.alone = [dist.new_group([0]), dist.new_group([1])][dist.get_rank()]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            rank = torch.tensor(float(self.global_rank))
            self.log("step_alone", rank, sync_dist=True, sync_dist_group=self.alone)  # mean over 1
            self.log("step_world", rank, sync_dist=True, sync_dist_group=dist.group.WORLD)
            return self.layer(batch[0]).sum()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            rank = torch.tensor(float(self.global_rank))
            self.log("epoch_alone", rank, sync_dist=True, sync_dist_group=self.alone, reduce_fx="sum")
            self.log("epoch_all", rank, sync_dist=True, reduce_fx="sum")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, logger=False, max_epochs=1, limit_train_batches=1,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    data = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2)
    trainer.fit(Grouped(), data, data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_sync_dist_group_reduces_within_the_group(tmp_path: Path) -> None:
    ranks = run_processes(_group_worker, str(tmp_path), nprocs=2)
    assert [r["step_alone"] for r in ranks] == [0.0, 1.0]  # a group of one: each its own (mean / 1)
    assert [r["step_world"] for r in ranks] == [0.5, 0.5]
    # 2 validation batches a process, summed: within the group, its own; else both processes'.
    assert [r["epoch_alone"] for r in ranks] == [0.0, 2.0]
    assert [r["epoch_all"] for r in ranks] == [2.0, 2.0]


# -- LearningRateMonitor(logging_interval=None) -------------------------------------------------------
class Rows(RowLogger):
    def row(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {k: round(v, 6) for k, v in metrics.items() if k.startswith("lr-")}


@pytest.mark.parametrize(
    ("interval", "logging_interval", "expected"),
    [
        # Lightning: at the start of each epoch, for a scheduler stepped per epoch ...
        ("epoch", None, [(0, 1.0), (4, 0.5)]),
        # ... before each batch after which a row is written (every log_every_n_steps) for one
        # stepped per step (ember writes it in that batch's row: Lightning's step + 1) ...
        ("step", None, [(2, 0.5), (4, 0.125), (6, 0.03125), (8, 0.007812)]),
        # ... and at both for an optimizer without a scheduler.
        (None, None, [(0, 1.0), (2, 1.0), (4, 1.0), (4, 1.0), (6, 1.0), (8, 1.0)]),
        ("epoch", "step", [(2, 1.0), (4, 1.0), (6, 0.5), (8, 0.5)]),
        ("step", "epoch", [(0, 1.0), (4, 0.0625)]),
    ],
)
def test_lr_monitor_follows_each_schedulers_interval(
    tmp_path: Path, interval: str | None, logging_interval: str | None, expected: list[tuple[int, float]]
) -> None:
    rows = Rows()
    trainer = _trainer(tmp_path, max_epochs=2, logger=rows, log_every_n_steps=2,
                       callbacks=[LearningRateMonitor(logging_interval=logging_interval)])  # fmt: skip
    trainer.fit(Net(interval), _loader())
    assert [(step, row["lr-SGD"]) for step, row in rows.rows] == expected
    # As Lightning's, the monitor's values are callback metrics too (the last one, a tensor).
    assert float(trainer.callback_metrics["lr-SGD"]) == pytest.approx(expected[-1][1], abs=1e-6)


# -- what the Trainer's metric dicts hold -----------------------------------------------------------
class Stages(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", float(batch_idx), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test", float(batch_idx))
        self.log("test_unlogged", float(batch_idx), logger=False)


def test_each_stage_starts_with_no_logged_values(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    module = Stages()
    trainer.fit(module, _loader(), _loader())
    assert set(trainer.callback_metrics) == {"loss", "val"}
    assert trainer.test(module, _loader(), verbose=False) == [{"test": 1.5}]
    # Lightning 2.6 resets the three at the start of every stage: the fit's values are gone.
    assert set(trainer.callback_metrics) == {"test", "test_unlogged"}
    assert trainer.logged_metrics == {"test": 1.5}
    assert trainer.progress_bar_metrics == {}
    # ... and a validate() after it holds its own alone.
    trainer.validate(module, _loader(), verbose=False)
    assert set(trainer.callback_metrics) == {"val"}
    assert trainer.logged_metrics == {"val": 1.5}
    assert trainer.progress_bar_metrics == {"val": 1.5}


def test_logged_metrics_hold_the_logged_values_without_epoch(tmp_path: Path) -> None:
    class Epochs(Rows):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.rows.append((step, metrics))

    rows = Epochs()
    trainer = _trainer(tmp_path, logger=rows, log_every_n_steps=2)  # (a row of step values too)
    trainer.fit(Stages(), _loader())
    assert all("epoch" in row for _, row in rows.rows)  # the loggers get it in every row ...
    assert set(trainer.logged_metrics) == {"loss"}  # ... trainer.logged_metrics not, as Lightning's


# -- torchmetrics: compute() at the end of the epoch, reset() after its end hooks --------------------
class Counted(Net):
    """Logs a sum of ones per step only (Lightning's default in training_step) and one per epoch."""

    def __init__(self) -> None:
        super().__init__()
        torchmetrics = pytest.importorskip("torchmetrics")
        self.per_step = torchmetrics.SumMetric()
        self.per_epoch = torchmetrics.SumMetric()
        self.at_epoch_end: list[tuple[float, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.per_step(torch.tensor(1.0))
        self.per_epoch(torch.tensor(1.0))
        self.log("per_step", self.per_step)
        self.log("per_epoch", self.per_epoch, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        # The torchmetrics idiom: the epoch's state is still there in the epoch-end hook.
        self.at_epoch_end.append((float(self.per_step.compute()), float(self.per_epoch.compute())))


def test_logged_torchmetrics_reset_after_the_epoch_end_hooks(tmp_path: Path) -> None:
    module = Counted()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, _loader())  # 4 batches an epoch
    # As Lightning 2.6: each epoch's 4 updates, the per-step metric reset at each epoch's end too.
    assert module.at_epoch_end == [(4.0, 4.0), (4.0, 4.0)]
    assert float(trainer.callback_metrics["per_epoch"]) == 4.0
    assert module.per_step.update_count == module.per_epoch.update_count == 0


def test_resume_after_the_epoch_end_resets_the_epochs_torchmetrics(tmp_path: Path) -> None:
    class Saves(Callback):
        monitoring = True  # saves after the epoch's end, where ModelCheckpoint does

        def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
            trainer.save_checkpoint(tmp_path / "epoch_end")  # before the metrics are reset

    _trainer(tmp_path, callbacks=[Saves()]).fit(Counted(), _loader())
    resumed = Counted()
    _trainer(tmp_path, max_epochs=2).fit(resumed, _loader(), ckpt_path=tmp_path / "epoch_end")
    assert resumed.at_epoch_end == [(4.0, 4.0)]  # the second epoch's alone


def test_one_metric_logged_for_several_loaders_shows_each_loaders_running_value(tmp_path: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics")

    class Shared(Net):
        def __init__(self) -> None:
            super().__init__()
            self.total = torchmetrics.SumMetric()

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.total.update(batch[0].sum())
            self.log("total", self.total)
            self.log("kept", self.total, add_dataloader_idx=False)  # the last loader's name wins

    def loader(value: float) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.full((4, 3), value)), batch_size=2)

    results = _trainer(tmp_path).validate(Shared(), [loader(1.0), loader(10.0)], verbose=False)
    # As Lightning 2.6: each loader's value is computed when it ends; the metric is reset at the end only.
    assert results == [{"total/dataloader_idx_0": 12.0}, {"total/dataloader_idx_1": 132.0, "kept": 132.0}]


def test_trainer_logger_can_be_assigned_as_in_lightning(tmp_path: Path) -> None:
    from ember import CSVLogger

    trainer = _trainer(tmp_path)
    csv_logger = CSVLogger(tmp_path)
    trainer.logger = csv_logger
    assert trainer.loggers == [csv_logger] and trainer.log_dir == csv_logger.log_dir
    trainer.logger = None
    assert trainer.loggers == [] and trainer.logger is None
    with pytest.raises(TypeError, match=r"trainer.logger = str\(...\): expected an ember Logger or None"):
        trainer.logger = "csv"  # type: ignore[assignment]
