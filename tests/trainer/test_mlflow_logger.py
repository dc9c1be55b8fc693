"""MLFlowLogger and log_with="mlflow": runs recorded in a local SQLite store, read back with MLflow's client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from logger_fits import Crash, csv_rows, fit

from ember import Accelerator, MLFlowLogger
from ember.callbacks import ModelCheckpoint

mlflow_tracking = pytest.importorskip("mlflow.tracking")  # (the dev extra installs it: the tests run)


def client_for(logger: MLFlowLogger) -> Any:
    return mlflow_tracking.MlflowClient(logger.tracking_uri)


def history(logger: MLFlowLogger, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client_for(logger).get_metric_history(logger.run_id, key)]


def artifacts(logger: MLFlowLogger, path: str | None = None) -> list[str]:
    return sorted(a.path for a in client_for(logger).list_artifacts(logger.run_id, path))


def test_fit_records_hyperparameters_metrics_status_and_the_kept_checkpoint(tmp_path: Path) -> None:
    logger = MLFlowLogger(
        experiment_name="reg", save_dir=tmp_path / "mlruns", log_model=True, tags={"team": 1}
    )
    trainer = fit(tmp_path, logger, callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=1)])
    run = client_for(logger).get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert logger.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    assert run.data.params == {"lr": "0.1", "layer/width": "3", "layer/kind": "linear"}
    assert run.data.tags["team"] == "1"
    # The same rows as the CSV logger writes: loss_step every step, val_loss per epoch (global steps).
    assert [step for step, _ in history(logger, "loss_step")] == list(range(1, 9))
    assert [step for step, _ in history(logger, "val_loss")] == [4, 8]
    best = Path(trainer.checkpoint_callback.best_model_path).name  # type: ignore[union-attr]
    # Uploaded at the end of the fit: only the checkpoint kept (save_top_k=1), as a directory.
    assert artifacts(logger, "checkpoints") == [f"checkpoints/{best}"]
    assert f"checkpoints/{best}/manifest.json" in artifacts(logger, f"checkpoints/{best}")


def test_log_model_all_uploads_each_checkpoint_as_it_is_saved(tmp_path: Path) -> None:
    logger = MLFlowLogger(save_dir=tmp_path / "mlruns", log_model="all")
    fit(tmp_path, logger, callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=1)])
    assert artifacts(logger, "checkpoints") == ["checkpoints/epoch=0-step=4", "checkpoints/epoch=1-step=8"]


def test_a_failed_fit_ends_the_run_failed_and_a_resume_continues_it(tmp_path: Path) -> None:
    save_dir = tmp_path / "mlruns"
    first = MLFlowLogger(experiment_name="reg", save_dir=save_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, first, epochs=2, callbacks=[ModelCheckpoint(save_last=True), Crash(at_step=6)])
    assert client_for(first).get_run(first.run_id).info.status == "FAILED"
    second = MLFlowLogger(experiment_name="reg", save_dir=save_dir)
    fit(tmp_path, second, epochs=2, callbacks=[ModelCheckpoint(save_last=True)],
        ckpt_path=tmp_path / "checkpoints" / "last")  # fmt: skip
    assert second.run_id == first.run_id
    run = client_for(second).get_run(second.run_id)
    assert run.info.status == "FINISHED"
    # Steps 1-6 before the crash, then 5-8 from the checkpoint of step 4: one run, as in the CSV file.
    # Step 6 crashed in on_train_batch_end, before its row was written: as in Lightning, the row
    # comes after that hook.
    assert sorted(step for step, _ in history(second, "loss_step")) == sorted([*range(1, 6), *range(5, 9)])


def test_given_run_id_wins_over_the_checkpoints_with_a_warning(tmp_path: Path) -> None:
    logger = MLFlowLogger(save_dir=tmp_path, run_id="abc")
    with pytest.warns(UserWarning, match="not continuing the checkpoint's MLflow run 'xyz'"):
        logger.load_state_dict({"run_id": "xyz", "experiment_name": "ember_logs", "logged_checkpoints": {}})
    assert logger.state_dict()["run_id"] == "abc"


def test_tracking_uri_from_the_environment_and_keys_mlflow_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    logger = MLFlowLogger(save_dir=tmp_path / "unused", prefix="train")
    assert logger.tracking_uri == elsewhere
    with pytest.warns(UserWarning, match=r"'train-acc@top\(1\)' is logged as 'train-acctop1'"):
        logger.log_metrics({"acc@top(1)": 0.5}, step=2)
    logger.log_text({"note": "hello"}, step=2)
    logger.finalize("interrupted")
    run = client_for(logger).get_run(logger.run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"train-acctop1": 0.5}
    assert artifacts(logger, "text/note") == ["text/note/step_2.txt"]
    assert not (tmp_path / "unused" / "mlflow.db").exists()


def test_accelerator_log_with_mlflow(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="mlflow", project_dir=tmp_path)
    accelerator.init_trackers("proj", config={"lr": 0.1, "opt": {"name": "sgd"}})
    accelerator.log({"loss": torch.tensor(1.5), "eval": {"acc": 0.25}}, step=3)
    accelerator.log({"loss": 1.0})
    tracker = accelerator.get_tracker("mlflow")
    assert (
        isinstance(tracker, MLFlowLogger)
        and accelerator.get_tracker("mlflow", unwrap=True) is tracker.experiment
    )
    accelerator.end_training()
    run = client_for(tracker).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "opt/name": "sgd"}
    assert history(tracker, "loss") == [(3, 1.5), (4, 1.0)] and history(tracker, "eval/acc") == [(3, 0.25)]
    assert tracker.tracking_uri == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"
    assert client_for(tracker).get_experiment(tracker.experiment_id).name == "proj"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"log_model": "best"},
            ValueError,
            r"MLFlowLogger\(log_model='best'\): valid choices are False, True, 'all'",
        ),
        ({"tags": ["a"]}, TypeError, r"MLFlowLogger\(tags=\['a'\]\) must be None or a dict with string keys"),
        ({"experiment_name": ""}, ValueError, "must name an experiment"),
        ({"tracking_uri": 3}, TypeError, r"tracking_uri=3.*must be a string or None"),
        ({"synchronous": "yes"}, TypeError, r"synchronous='yes'.*True or False or None"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        MLFlowLogger(save_dir=tmp_path / "mlruns", **kwargs)
    assert not (tmp_path / "mlruns").exists()


def test_the_csv_rows_and_mlflow_metrics_agree(tmp_path: Path) -> None:
    from ember import CSVLogger

    mlflow_logger, csv_logger = MLFlowLogger(save_dir=tmp_path / "mlruns"), CSVLogger(tmp_path)
    fit(tmp_path, [csv_logger, mlflow_logger], epochs=1)
    rows = [r for r in csv_rows(Path(csv_logger.log_dir) / "metrics.csv") if r["loss_step"]]
    assert [(int(r["step"]), pytest.approx(float(r["loss_step"]))) for r in rows] == history(
        mlflow_logger, "loss_step"
    )
