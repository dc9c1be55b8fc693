"""Loggers against Lightning 2.6.6's: a reused version folder, Namespaces as hyper-parameters, Lightning's
arguments of TensorBoardLogger and WandbLogger (refused when the logger is made, or honoured)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ember import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))


def test_csv_logger_writes_into_a_version_whose_file_has_other_columns(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"a": 1.0, "b": 2.0}, 0)
    first.save()
    again = CSVLogger(tmp_path, version=0)  # a new run told to use the same folder
    again.log_metrics({"a": 3.0}, 1)
    again.save()
    again.log_metrics({"a": 4.0}, 2)
    again.save()
    with open(again.metrics_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [
        ("0", "1.0", "2.0"),
        ("1", "3.0", ""),
        ("2", "4.0", ""),
    ]


def test_namespaces_as_hyper_parameters_become_dicts(tmp_path: Path) -> None:
    params = argparse.Namespace(lr=0.1, optimizer=argparse.Namespace(name="sgd", momentum=0.9))
    csv_logger = CSVLogger(tmp_path)
    csv_logger.log_hyperparams(params)  # type: ignore[arg-type]
    expected = {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}}
    assert json.loads((Path(csv_logger.log_dir) / "hparams.json").read_text()) == expected
    tensorboard = TensorBoardLogger(tmp_path)
    tensorboard.log_hyperparams({"args": params})
    assert json.loads((Path(tensorboard.log_dir) / "hparams.json").read_text()) == {"args": expected}
    tensorboard.finalize("success")
    wandb_logger = WandbLogger(project="p", save_dir=tmp_path)
    wandb_logger.log_hyperparams(params)  # type: ignore[arg-type]
    assert wandb_logger.experiment.config["optimizer"] == {"name": "sgd", "momentum": 0.9}
    wandb_logger.finalize("success")


def test_tensorboard_logger_refuses_an_unknown_writer_argument_when_made(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"TensorBoardLogger\(flush_every=3\).*flush_secs"):
        TensorBoardLogger(tmp_path, flush_every=3)
    TensorBoardLogger(tmp_path, flush_secs=5, max_queue=3)  # SummaryWriter's own


@pytest.mark.parametrize("make", [CSVLogger, TensorBoardLogger])
def test_a_given_version_is_kept_when_a_fit_resumes_from_another_versions_checkpoint(
    tmp_path: Path, make: type[CSVLogger] | type[TensorBoardLogger]
) -> None:
    first = make(tmp_path)
    first.log_metrics({"a": 1.0}, 0)
    state = first.state_dict()  # the checkpoint of a run in version_0
    first.finalize("success")
    given = make(tmp_path, version=5)
    with pytest.warns(UserWarning, match=r"/version_0.*version=5"):
        given.load_state_dict(state)
    assert (given.version, Path(given.log_dir).name) == (5, "version_5")
    same = make(tmp_path, version=0)  # the checkpoint's own version, given: continued, silently
    same.load_state_dict(state)
    assert same.version == 0


def test_csv_logger_writes_a_tensor_metric_as_its_number(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"a": torch.tensor(1.5), "b": torch.tensor(2)}, 0)  # type: ignore[dict-item]
    logger.save()
    with open(logger.metrics_file, newline="") as f:
        assert list(csv.DictReader(f)) == [{"step": "0", "a": "1.5", "b": "2"}]


def test_reading_a_finished_mlflow_run_through_experiment_leaves_it_finished(tmp_path: Path) -> None:
    logger = MLFlowLogger(experiment_name="reg", save_dir=tmp_path / "mlruns")
    logger.log_metrics({"loss": 1.0}, 0)
    logger.finalize("success")
    # As the docs do: read the run back through the logger's client.
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"
    logger.log_metrics({"loss": 0.5}, 1)  # a later write (trainer.test()) continues it
    assert logger.experiment.get_run(logger.run_id).info.status == "RUNNING"
    logger.finalize("success")
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("make", [CSVLogger, TensorBoardLogger])
def test_save_dir_and_root_dir_as_lightning(
    tmp_path: Path, make: type[CSVLogger] | type[TensorBoardLogger]
) -> None:
    logger = make(tmp_path / "runs", name="exp", version=3)
    assert logger.save_dir == str(tmp_path / "runs")
    assert logger.root_dir == str(tmp_path / "runs" / "exp")
    assert logger.log_dir == str(tmp_path / "runs" / "exp" / "version_3")


def test_csv_logger_writes_nothing_on_other_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module hook's ``self.logger.log_metrics(...)`` runs on every rank: only rank 0 writes (as Lightning's
    rank-zero-only CSVLogger), so rank 1 leaves no stray ``version_1`` folder."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams({"lr": 1.0})
    logger.log_metrics({"a": 1.0}, 0)
    logger.log_text({"t": "x"}, 0)
    logger.finalize("success")
    assert not (tmp_path / "logs").exists()


def test_csv_logger_takes_lightnings_prefix_flush_name_and_no_name(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name=None, prefix="train", flush_logs_every_n_steps=1)
    assert logger.name == "" and logger.log_dir == str(tmp_path / "version_0")  # no subfolder
    logger.log_metrics({"loss": 0.5}, step=3)  # written at once (every 1 row)
    rows = list(csv.DictReader(open(logger.metrics_file)))
    assert rows == [{"step": "3", "train-loss": "0.5"}]
    with pytest.raises(ValueError, match=r"flush_every_n_rows=5, flush_logs_every_n_steps=2\): give one"):
        CSVLogger(tmp_path, flush_every_n_rows=5, flush_logs_every_n_steps=2)


def test_wandb_logger_logs_lightnings_tables_texts_and_images(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "_wandb_readers", Path(__file__).with_name("test_loggers.py")
    )
    assert spec is not None and spec.loader is not None
    readers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readers)  # (the offline run's file readers of the W&B tests)
    wandb_history, wandb_records, wandb_runs = (
        readers.wandb_history,
        readers.wandb_records,
        readers.wandb_runs,
    )

    logger = WandbLogger(project="p", save_dir=tmp_path)
    logger.log_table("table", columns=["a", "b"], data=[[1, 2], [3, 4]], step=1)
    logger.log_text("samples", ["text"], [["hello"]])  # Lightning's positional form: a table
    logger.log_image("images", [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)], step=2, caption=["zero", "one"])
    logger.log_text({"note": "plain"}, 3)  # ember's form (accelerator.log): a string in the history
    with pytest.raises(ValueError, match=r"log_image\(caption=...\) needs a list of 2 values"):
        logger.log_image("images", [torch.zeros(3, 4, 4)] * 2, caption=["only one"])
    logger.finalize("success")
    rows = wandb_history(wandb_records(wandb_runs(tmp_path)[0]))
    kinds = {
        key.removesuffix("/_type"): value
        for row in rows
        for key, value in row.items()
        if key.endswith("/_type")
    }
    assert kinds == {"table": "table-file", "samples": "table-file", "images": "images/separated"}
    assert {"note": "plain", "trainer/global_step": 3} in rows
    images = [row for row in rows if "images/_type" in row]
    assert [(row["trainer/global_step"], row["images/captions"]) for row in images] == [(2, ["zero", "one"])]
    assert [row["table/nrows"] for row in rows if "table/nrows" in row] == [2]
