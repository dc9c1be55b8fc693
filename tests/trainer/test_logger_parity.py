"""Loggers against Lightning 2.6.6's: what each keeps across calls, and the attributes Lightning code reads
(``group_separator``, ``sub_dir``, ``log_graph``, ``trainer.log_dir``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import CSVLogger, MLFlowLogger, TensorBoardLogger, Trainer, TrainModule, WandbLogger
from ember.trainer.loggers import Logger


@pytest.fixture
def _wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, and nothing written outside the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))


@pytest.mark.parametrize("make", [CSVLogger, TensorBoardLogger])
def test_hparams_file_keeps_every_call_as_lightning(
    tmp_path: Path, make: type[CSVLogger] | type[TensorBoardLogger]
) -> None:
    """Lightning's loggers update their hparams with each call (hparams.yaml holds all of them): a
    ``log_hyperparams({"config": ...})`` after the Trainer's (``TrainerCLI.save_config``) adds to the module's."""
    logger = make(tmp_path)
    logger.log_hyperparams({"lr": 0.1, "layer": {"width": 3}})
    logger.log_hyperparams({"config": {"seed": 1}, "lr": 0.2})
    logger.finalize("success")
    written = json.loads((Path(logger.log_dir) / "hparams.json").read_text())
    assert written == {"lr": 0.2, "layer": {"width": 3}, "config": {"seed": 1}}


@pytest.mark.parametrize("make", [CSVLogger, TensorBoardLogger, WandbLogger, MLFlowLogger])
def test_group_separator_as_lightning(tmp_path: Path, make: type[Logger]) -> None:
    """Lightning code joins metric groups with ``logger.group_separator`` (``grad_norm(...,
    group_separator=self.logger.group_separator)``)."""
    assert make(save_dir=tmp_path).group_separator == "/"  # type: ignore[call-arg]


def test_tensorboard_sub_dir_as_lightning(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=2, sub_dir="train")
    assert logger.sub_dir == "train"
    assert logger.log_dir == str(tmp_path / "tb" / "version_2" / "train")
    assert logger.root_dir == str(tmp_path / "tb")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.0}, 1)
    logger.finalize("success")
    assert (tmp_path / "tb" / "version_2" / "train" / "hparams.json").exists()
    assert list((tmp_path / "tb" / "version_2" / "train").glob("events.out.tfevents.*"))
    # the next free version counts the version folders, not the sub-folders
    assert TensorBoardLogger(tmp_path, name="tb", sub_dir="train").version == 3
    with pytest.raises(TypeError, match=r"TensorBoardLogger\(sub_dir=1\)"):
        TensorBoardLogger(tmp_path, sub_dir=1)  # type: ignore[arg-type]


@pytest.mark.usefixtures("_wandb_offline")
def test_trainer_log_dir_of_a_wandb_or_mlflow_logger_is_its_save_dir(tmp_path: Path) -> None:
    """As Lightning's ``trainer.log_dir``: the first logger's ``log_dir`` for a CSV or TensorBoard logger,
    else its ``save_dir``, which does not change when the run opens (and is the same on every rank)."""
    wandb_logger = WandbLogger(save_dir=tmp_path / "wb", offline=True)
    trainer = Trainer(
        max_epochs=1, logger=[wandb_logger, CSVLogger(tmp_path)], default_root_dir=str(tmp_path)
    )
    assert trainer.log_dir == str(tmp_path / "wb")
    wandb_logger.experiment  # noqa: B018  (opens the run: its log_dir is now the run's folder)
    try:
        assert wandb_logger.log_dir != str(tmp_path / "wb")
        assert trainer.log_dir == str(tmp_path / "wb")
    finally:
        wandb_logger.finish()
    mlflow_logger = MLFlowLogger(save_dir=tmp_path / "ml")
    assert (
        Trainer(max_epochs=1, logger=[mlflow_logger], default_root_dir=str(tmp_path)).log_dir
        == mlflow_logger.save_dir
    )
    csv_first = Trainer(
        max_epochs=1, logger=[CSVLogger(tmp_path, name="c"), mlflow_logger], default_root_dir=str(tmp_path)
    )
    assert csv_first.log_dir == str(tmp_path / "c" / "version_0")


class _Graphed(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.example_input_array = torch.zeros(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _graph_runs(log_dir: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"graph": 0})
    events.Reload()
    return int(events.Tags()["graph"])


def test_tensorboard_log_graph_as_lightning(tmp_path: Path) -> None:
    """``TensorBoardLogger(log_graph=True)``: the module's graph, traced with ``example_input_array``, at
    the start of the stage; every logger has ``log_graph`` (the others' do nothing)."""
    loggers = [
        TensorBoardLogger(tmp_path, name="on", log_graph=True),
        TensorBoardLogger(tmp_path, name="off"),
    ]
    loggers.append(CSVLogger(tmp_path))
    trainer = Trainer(max_epochs=1, logger=loggers, log_every_n_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
    data = TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    trainer.fit(_Graphed(), DataLoader(data, batch_size=2))
    assert _graph_runs(loggers[0].log_dir) == 1 and _graph_runs(loggers[1].log_dir) == 0
    without_example = _Graphed()
    without_example.example_input_array = None
    with pytest.warns(UserWarning, match="log_graph.*example_input_array"):
        loggers[0].log_graph(without_example)
    with pytest.raises(TypeError, match=r"TensorBoardLogger\(log_graph='yes'\)"):
        TensorBoardLogger(tmp_path, log_graph="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("default_hp_metric", [True, False])
def test_tensorboard_default_hp_metric_as_lightning(tmp_path: Path, default_hp_metric: bool) -> None:
    """Lightning's default is True (an ``hp_metric`` of -1 at step 0 with the hyper-parameters); ember's is
    False, and Lightning code that turns it off runs unchanged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, default_hp_metric=default_hp_metric)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"lr": 0.1}, metrics={"hp/accuracy": 0.0})  # given metrics: no hp_metric
    logger.log_metrics({"loss": 1.0}, 1)
    logger.finalize("success")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    expected = {"hp/accuracy", "loss"} | ({"hp_metric"} if default_hp_metric else set())
    assert set(events.Tags()["scalars"]) == expected
    if default_hp_metric:
        assert [(e.step, e.value) for e in events.Scalars("hp_metric")] == [(0, -1.0)]
    with pytest.raises(TypeError, match=r"TensorBoardLogger\(default_hp_metric=1\)"):
        TensorBoardLogger(tmp_path, default_hp_metric=1)  # type: ignore[arg-type]


def test_csv_experiment_is_a_writer_as_lightning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's ``CSVLogger.experiment`` is its writer: ``log_metrics(dict, step=None)``, ``log_hparams``,
    ``save()``, ``metrics_file_path``, ``log_dir``; its rows land in the logger's ``metrics.csv``."""
    logger = CSVLogger(tmp_path, prefix="p")
    writer = logger.experiment
    assert writer is logger.experiment and logger.tracker is logger  # (Accelerate's unwrap: unchanged)
    assert writer.log_dir == logger.log_dir and writer.metrics_file_path == str(logger.metrics_file)
    writer.log_metrics({"a": torch.tensor(1.0)})  # no step: the row's index, as Lightning
    writer.log_metrics({"a": 2.0})
    logger.log_metrics({"b": 3.0}, step=7)  # the logger's prefix; the writer adds none, as Lightning
    writer.log_hparams({"x": 1})
    logger.log_hyperparams({"y": 2})
    writer.save()
    with open(writer.metrics_file_path) as f:
        assert f.read().splitlines() == ["step,a,p-b", "0,1.0,", "1,2.0,", "7,,3.0"]
    assert json.loads((Path(logger.log_dir) / "hparams.json").read_text()) == {"x": 1, "y": 2}
    assert writer.hparams == {"x": 1, "y": 2}
    # Other ranks than 0: calls on the experiment do nothing, as the logger's own.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = CSVLogger(tmp_path / "rank1")
    other.experiment.log_metrics({"a": 1.0}, step=0)
    other.experiment.log_hparams({"x": 1})
    other.experiment.save()
    assert not (tmp_path / "rank1").exists()


def test_accelerator_unwraps_a_csv_tracker_to_the_logger_itself(tmp_path: Path) -> None:
    from ember import Accelerator

    accelerator = Accelerator(log_with="csv", project_dir=tmp_path)
    accelerator.init_trackers("proj")
    logger = accelerator.get_tracker("csv")
    assert accelerator.get_tracker("csv", unwrap=True) is logger  # not its experiment (the writer)
    accelerator.end_training()


def test_csv_experiment_rows_join_the_trainers_in_a_fit(tmp_path: Path) -> None:
    class Module(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def on_fit_start(self) -> None:
            self.logger.experiment.log_hparams({"extra": 1})

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = F.mse_loss(self.layer(batch[0]), batch[1])
            self.log("loss", loss)
            self.logger.experiment.log_metrics({"custom": float(batch_idx)}, step=self.global_step)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(4, 2), torch.randn(4, 1))
    logger = CSVLogger(tmp_path)
    trainer = Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Module(), DataLoader(data, batch_size=2))
    with open(logger.metrics_file) as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["custom"]) for r in rows if r["custom"]] == [("0", "0.0"), ("1", "1.0")]
    assert len([r for r in rows if r["loss"]]) == 2  # the Trainer's rows beside them
    assert json.loads((Path(logger.log_dir) / "hparams.json").read_text()) == {"extra": 1}
