"""W&B, TensorBoard and CSV loggers on the Trainer, and the Accelerator's trackers (the same classes).

W&B runs offline: what a run logged is read back from its ``run-<id>.wandb`` file (LevelDB-style
log of protobuf ``Record``s; wandb has no public reader for it).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import PYTHON, REPO, base_env, run_command, run_processes
from logger_fits import Crash, _data, csv_rows, fit
from torch.utils.data import DataLoader

from ember import Accelerator, CSVLogger, TensorBoardLogger, WandbLogger
from ember.callbacks import ModelCheckpoint


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, and nothing written outside the test's directory (W&B stages artifacts in its data dir)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, folder in (("WANDB_DIR", "wandb-dir"), ("WANDB_DATA_DIR", "wandb-data"),
                         ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config")):  # fmt: skip
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))


# -- reading what W&B and TensorBoard wrote ----------------------------------------------------------
def wandb_records(run_dir: Path, timeout: float = 30.0) -> list[Any]:
    """The protobuf records of a finished offline run's ``run-<id>.wandb`` file, in order.

    ``run.finish()`` returns before W&B's service process has flushed the file: wait for the run's
    ``exit`` record. A run still open in this process (a WandbLogger keeps its run open after a
    successful stage, as Lightning's) is finished first.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
    deadline = time.monotonic() + timeout
    while True:
        records = _read_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_records(run_dir: Path) -> list[Any]:
    """The file is ":W&B" + 0xBEE1 + version (7 bytes), then 32 KiB blocks of LevelDB log records:
    crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last), data."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    """The rows of ``run.log``, without W&B's own ``_step``/``_runtime``/``_timestamp``."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def wandb_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        )
        config.update({_key(item): json.loads(item.value_json) for item in updates})
    config.pop("_wandb", None)
    return config


def of_type(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def wandb_runs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / "wandb").glob("offline-run-*"))


def tensorboard_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# -- W&B ----------------------------------------------------------------------------------------------
def test_wandb_offline_run_with_csv_and_tensorboard_beside_it(tmp_path: Path) -> None:
    wandb_logger = WandbLogger(
        project="ember-tests", name="tiny", save_dir=tmp_path, offline=True, tags=["t"]
    )
    csv_logger, tb_logger = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    trainer = fit(tmp_path, [csv_logger, wandb_logger, tb_logger])
    run_object = wandb_logger.experiment
    # As Lightning's, the run stays open after the fit: validate() logs to the same run, in the same
    # offline directory (not a second one); it finishes at exit or, here, by hand.
    trainer.validate(dataloaders=DataLoader(_data(8), batch_size=4))
    assert wandb_logger.experiment is run_object
    run_object.finish()

    (run_dir,) = wandb_runs(tmp_path)
    assert run_dir.name.endswith(f"-{wandb_logger.version}") and wandb_logger.log_dir == str(run_dir)
    records = wandb_records(run_dir)
    (run,) = of_type(records, "run")
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (
        wandb_logger.version,
        "ember-tests",
        "tiny",
        ["t"],
    )
    assert wandb_config(records) == {"lr": 0.1, "layer": {"width": 3, "kind": "linear"}}
    # Every row at the Trainer's step, in the name W&B plots everything against.
    metrics = {m.name or m.glob_name: m.step_metric for m in of_type(records, "metric")}
    assert metrics == {"trainer/global_step": "", "*": "trainer/global_step"}
    rows = wandb_history(records)
    expected = [
        {"trainer/global_step": int(r["step"]), **{k: float(v) for k, v in r.items() if v and k != "step"}}
        for r in csv_rows(csv_logger.metrics_file)
    ]
    # 8 step rows, 2 validations, 2 epoch rows, then validate()'s row
    assert rows == expected and len(rows) == 8 + 2 + 2 + 1
    assert [r["trainer/global_step"] for r in rows if "val_loss" in r] == [4, 8, 8]
    assert rows[-1] == {"val_loss": rows[-3]["val_loss"], "epoch": 2, "trainer/global_step": 8}
    assert of_type(records, "exit")[0].exit_code == 0
    assert not wandb_runs(tmp_path / "wandb-dir")  # save_dir is where the run goes

    scalars = tensorboard_scalars(tb_logger.log_dir)
    assert scalars["loss_step"] == [
        (r["trainer/global_step"], pytest.approx(r["loss_step"])) for r in rows if "loss_step" in r
    ]  # TensorBoard keeps float32
    assert trainer.logger is csv_logger and trainer.loggers == [csv_logger, wandb_logger, tb_logger]


def test_wandb_logger_keeps_its_run_for_a_second_fit_and_another_logger_finishes_it(tmp_path: Path) -> None:
    """Lightning's sequence: fit twice with one WandbLogger, look at ``experiment`` in between: one run."""
    import wandb

    logger = WandbLogger(project="again", save_dir=tmp_path, offline=True)
    fit(tmp_path, logger, epochs=1)
    run = logger.experiment
    fit(tmp_path, logger, epochs=1)
    assert logger.experiment is run and len(wandb_runs(tmp_path)) == 1
    # A new WandbLogger finishes the run kept open (W&B has one active run per process), not logs to it.
    other = WandbLogger(project="again", save_dir=tmp_path, offline=True)
    other.log_metrics({"b": 1.0}, step=0)
    assert other.version != logger.version and run._is_finished
    first = next(d for d in wandb_runs(tmp_path) if d.name.endswith(logger.version))
    records = wandb_records(first)
    assert [r["trainer/global_step"] for r in wandb_history(records) if "val_loss" in r] == [4, 4]
    assert of_type(records, "exit")[0].exit_code == 0
    # The first logger's next use re-opens its run id.
    logger.log_metrics({"c": 1.0}, step=9)
    assert logger.experiment.id == logger.version and wandb.run is logger.experiment


def test_wandb_logger_logs_to_an_active_run(tmp_path: Path) -> None:
    import wandb

    run = wandb.init(project="sweep", dir=str(tmp_path))
    try:
        logger = WandbLogger(project="other", save_dir=tmp_path / "elsewhere")
        with pytest.warns(
            UserWarning, match=f"a W&B run is already active \\(id {run.id}\\); WandbLogger logs to it"
        ):
            logger.log_metrics({"a": 1.0}, step=3)
        logger.finalize("success")
        assert logger.version == run.id and wandb.run is run  # still open: its owner finishes it
    finally:
        run.finish()
    assert wandb_history(wandb_records(wandb_runs(tmp_path)[0])) == [{"a": 1, "trainer/global_step": 3}]
    assert not (tmp_path / "elsewhere").exists()


def test_wandb_logger_takes_lightnings_dir_and_checkpoint_name(tmp_path: Path) -> None:
    logger = WandbLogger(project="p", dir=str(tmp_path / "runs"), log_model=True, checkpoint_name="weights")
    assert logger.save_dir == str(tmp_path / "runs")
    fit(tmp_path, logger, epochs=1, callbacks=[ModelCheckpoint()])
    artifacts = of_type(wandb_records(wandb_runs(tmp_path / "runs")[0]), "artifact")
    assert [(a.type, a.name) for a in artifacts] == [("model", "weights")]
    with pytest.raises(ValueError, match=r"WandbLogger\(save_dir='a', dir='b'\)"):
        WandbLogger(project="p", save_dir="a", dir="b")


def test_wandb_init_arguments_of_the_logger_can_be_given(tmp_path: Path) -> None:
    """Lightning passes ``resume=`` and ``mode=`` on to ``wandb.init``, over its own defaults."""
    logger = WandbLogger(project="p", save_dir=tmp_path, resume="never", mode="offline")
    logger.log_metrics({"a": 1.0}, 0)
    assert logger.experiment.settings.resume == "never" and logger.experiment.settings.mode == "offline"
    logger.finalize("success")
    with pytest.raises(ValueError, match=r"WandbLogger\(offline=True, mode='online'\)"):
        WandbLogger(project="p", offline=True, mode="online")


def test_tensorboard_log_hyperparams_with_metrics_as_lightning(tmp_path: Path) -> None:
    """Lightning's ``log_hyperparams(params, metrics)``: the metrics are scalars at step 0."""
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.1}, {"hp/accuracy": 0.0})
    logger.finalize("success")
    assert tensorboard_scalars(logger.log_dir)["hp/accuracy"] == [(0, 0.0)]


@pytest.mark.parametrize("log_model", [True, "all"])
def test_wandb_log_model_uploads_checkpoint_directories(tmp_path: Path, log_model: Any) -> None:
    logger = WandbLogger(project="models", save_dir=tmp_path, offline=True, log_model=log_model)
    # True: the survivors at the end (here the best by val_loss); "all": every checkpoint when saved.
    keep = ModelCheckpoint(monitor="val_loss", save_top_k=1 if log_model is True else -1)
    fit(tmp_path, logger, callbacks=[keep])

    records = wandb_records(wandb_runs(tmp_path)[0])
    artifacts = of_type(records, "artifact")
    metadata = [json.loads(a.metadata) for a in artifacts]
    names = [m["original_filename"] for m in metadata]
    assert names == (
        [Path(keep.best_model_path).name] if log_model is True else ["epoch=0-step=4", "epoch=1-step=8"]
    )
    assert [m["score"] for m in metadata] == [
        keep.best_k_models[str(tmp_path / "checkpoints" / n)] for n in names
    ]
    assert metadata[0]["ModelCheckpoint"]["monitor"] == "val_loss"
    for artifact in artifacts:
        assert (artifact.type, artifact.name) == ("model", f"model-{logger.version}")
        files = {entry.path for entry in artifact.manifest.contents}
        assert {"manifest.json", "model.safetensors", "trainer_state.json"} <= files  # the whole directory
    # "best": the best checkpoint when it was uploaded
    scores = [m["score"] for m in metadata]
    best_then = [score == min(scores[: i + 1]) for i, score in enumerate(scores)]
    assert [sorted(a.aliases) for a in artifacts] == [
        ["best", "latest"] if b else ["latest"] for b in best_then
    ]
    kinds = [r.WhichOneof("record_type") for r in records]
    last_row = max(i for i, kind in enumerate(kinds) if kind == "history")
    if log_model is True:  # at the end of the fit, after the last row
        assert kinds.index("artifact") > last_row
    else:  # as each checkpoint is saved: the first before the second epoch's rows
        assert kinds.index("artifact") < last_row


def test_resume_continues_the_wandb_run_and_the_tensorboard_version(tmp_path: Path) -> None:
    reference = TensorBoardLogger(tmp_path / "reference")
    fit(tmp_path / "reference", reference, epochs=3)

    def loggers() -> list[Any]:
        return [TensorBoardLogger(tmp_path / "run"), WandbLogger(project="resume", save_dir=tmp_path / "run")]

    first = loggers()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "run", first, epochs=3, callbacks=[ModelCheckpoint(save_top_k=-1), Crash(at_step=6)])
    # The checkpoint at the end of epoch 0 (after its validation and its epoch row); the crashed run
    # logged steps 5 to 6 after it.
    resumed = loggers()
    fit(tmp_path / "run", resumed, epochs=3, ckpt_path=tmp_path / "run" / "checkpoints" / "epoch=0-step=4")

    # TensorBoard: one version, and what it shows is what a run that never stopped shows.
    assert (
        resumed[0].log_dir == first[0].log_dir
        and len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
    )
    assert tensorboard_scalars(resumed[0].log_dir) == tensorboard_scalars(reference.log_dir)

    # W&B: the same run id, re-opened; the crashed part ended with a failure exit code.
    crashed, continued = (wandb_records(d) for d in wandb_runs(tmp_path / "run"))
    assert resumed[1].version == first[1].version
    assert of_type(crashed, "run")[0].run_id == of_type(continued, "run")[0].run_id == first[1].version
    assert of_type(crashed, "exit")[0].exit_code == 1 and of_type(continued, "exit")[0].exit_code == 0
    steps = [row["trainer/global_step"] for row in wandb_history(continued)]
    assert steps[0] == 5 and steps[-1] == 12 and steps == sorted(steps)
    assert wandb_config(continued) == {"lr": 0.1, "layer": {"width": 3, "kind": "linear"}}


def test_wandb_logger_arguments_and_other_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"log_model='best'\): valid choices are False, True, 'all'"):
        WandbLogger(log_model="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass one run id, not two"):
        WandbLogger(version="a", id="b")
    assert WandbLogger(id="abc").version == "abc" and len(WandbLogger().version) == 8
    # Rank 1 of a launched job: no run is opened, calls on the experiment do nothing.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = WandbLogger(save_dir=tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.experiment.log({"b": 2.0})
    logger.finalize("success")
    tensorboard = TensorBoardLogger(tmp_path)
    tensorboard.log_hyperparams({"lr": 1.0})
    tensorboard.log_metrics({"a": 1.0}, step=0)
    tensorboard.experiment.add_histogram("w", torch.zeros(3), 0)
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "tensorboard").exists()


def test_importing_ember_imports_neither_wandb_nor_tensorboard_nor_mlflow() -> None:
    code = "import sys, ember, ember.trainer; print(sorted(m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard', 'mlflow', 'comet_ml') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=base_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- TensorBoard --------------------------------------------------------------------------------------
def test_tensorboard_scalars_hparams_and_versions(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", prefix="fit")
    trainer = fit(tmp_path, logger)
    assert logger.log_dir == str(tmp_path / "tb" / "version_0") == trainer.log_dir
    scalars = tensorboard_scalars(logger.log_dir)
    assert set(scalars) == {"fit-loss_step", "fit-loss_epoch", "fit-val_loss", "fit-epoch"}
    assert [step for step, _ in scalars["fit-loss_step"]] == list(range(1, 9))
    assert [step for step, _ in scalars["fit-val_loss"]] == [4, 8]
    assert json.loads((Path(logger.log_dir) / "hparams.json").read_text()) == {
        "lr": 0.1, "layer": {"width": 3, "kind": "linear"}
    }  # fmt: skip

    # The HParams tab: the hyper-parameters (nested ones flattened), and every scalar as a metric.
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path / "tb"))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path / "tb"))
    hparams = backend_context.Context(
        base_plugin.TBContext(logdir=str(tmp_path / "tb"), multiplexer=multiplexer, data_provider=provider)
    )
    request = context.RequestContext()
    experiment = hparams.experiment_from_metadata(
        request, "", True, hparams.hparams_metadata(request, ""), []
    )
    assert {h.name for h in experiment.hparam_infos} == {"lr", "layer/width", "layer/kind"}
    assert {m.name.tag for m in experiment.metric_infos} == set(scalars)

    assert TensorBoardLogger(tmp_path, name="tb").version == 1  # the next free version


# -- Accelerator trackers -----------------------------------------------------------------------------
def test_accelerator_trackers(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with=["csv", "tensorboard", "wandb"], project_dir=tmp_path)
    accelerator.init_trackers("proj", config={"lr": 0.5}, init_kwargs={"wandb": {"name": "loop"}})
    for step in range(3):
        accelerator.log({"loss": torch.tensor(2.0**-step), "lr": 0.5}, step=step * 10)
    accelerator.log({"acc": 0.75})  # no step: one past the previous call's
    accelerator.log({"eval": {"loss": 0.5, "split": {"acc": 1.0}}, "note": "hello"}, step=30)
    csv_logger = accelerator.get_tracker("csv")
    run = accelerator.get_tracker("wandb", unwrap=True)
    assert isinstance(csv_logger, CSVLogger) and isinstance(
        accelerator.get_tracker("tensorboard"), TensorBoardLogger
    )
    assert run.name == "loop" and run.project == "proj"
    with pytest.raises(
        ValueError,
        match=r"get_tracker\('mlflow'\): no such tracker. Active trackers: \['csv', 'tensorboard', 'wandb'\]",
    ):
        accelerator.get_tracker("mlflow")
    with pytest.raises(
        TypeError, match="takes numbers, one-element tensors, strings and dicts of these; 'bad' is a list"
    ):
        accelerator.log({"bad": [1, 2]})
    import wandb

    assert wandb.run is run
    accelerator.end_training()
    assert wandb.run is None  # end_training finishes the run, as Accelerate's tracker.finish()

    root = tmp_path / "proj"
    assert sorted(p.name for p in root.iterdir()) == ["csv", "tensorboard", "wandb"]
    rows = csv_rows(root / "csv" / "version_0" / "metrics.csv")
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [
        ("0", "1.0", ""), ("10", "0.5", ""), ("20", "0.25", ""), ("21", "", "0.75"), ("30", "", "")
    ]  # fmt: skip
    assert (rows[-1]["eval/loss"], rows[-1]["eval/split/acc"], rows[-1]["note"]) == ("0.5", "1.0", "hello")
    assert json.loads((root / "csv" / "version_0" / "hparams.json").read_text()) == {"lr": 0.5}
    assert tensorboard_scalars(root / "tensorboard" / "version_0")["acc"] == [(21, 0.75)]
    (run_dir,) = wandb_runs(root)
    records = wandb_records(run_dir)
    assert wandb_config(records) == {"lr": 0.5}
    history = wandb_history(records)
    assert [r["trainer/global_step"] for r in history] == [0, 10, 20, 21, 30, 30]
    assert history[-2]["eval/split/acc"] == 1.0 and history[-1]["note"] == "hello"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = EventAccumulator(str(root / "tensorboard" / "version_0")).Reload().Tags()["tensors"]
    assert "note/text_summary" in texts


def test_accelerator_log_kwargs_reach_each_tracker(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with=["csv", "tensorboard", "wandb"], project_dir=tmp_path)
    accelerator.init_trackers("proj")
    with pytest.raises(
        ValueError,
        match=r"log_kwargs=\{'mlflow': \{\}\}: 'mlflow' is not a tracker of this Accelerator\. "
        r"Valid choices: \['csv', 'tensorboard', 'wandb'\]",
    ):
        accelerator.log({"loss": 1.0}, log_kwargs={"mlflow": {}})
    with pytest.raises(  # refused before any tracker logs: nothing of this call is written
        TypeError, match=r"log_kwargs\['csv'\]=\{'walltime': 5.0\}: CSVLogger.log_metrics does not take"
    ):
        accelerator.log({"loss": 1.0}, step=0, log_kwargs={"csv": {"walltime": 5.0}})
    # W&B: commit=False keeps the row open for the next call; TensorBoard: the event's wall time.
    accelerator.log(
        {"loss": 1.0, "note": "hi"},
        step=0,
        log_kwargs={"wandb": {"commit": False}, "tensorboard": {"walltime": 1234.5}},
    )
    accelerator.log({"acc": 0.5}, step=0)
    accelerator.end_training()

    root = tmp_path / "proj"
    rows = csv_rows(root / "csv" / "version_0" / "metrics.csv")
    assert [(r["step"], r["loss"], r["note"], r["acc"]) for r in rows] == [
        ("0", "1.0", "hi", ""),
        ("0", "", "", "0.5"),
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tensorboard" / "version_0")).Reload()
    assert [e.wall_time for e in events.Scalars("loss")] == [1234.5]
    assert [e.wall_time for e in events.Tensors("note/text_summary")] == [1234.5]
    assert events.Scalars("acc")[0].wall_time > 1234.5  # no log_kwargs: now
    (run_dir,) = wandb_runs(root)
    assert wandb_history(wandb_records(run_dir)) == [
        {"loss": 1.0, "note": "hi", "acc": 0.5, "trainer/global_step": 0}
    ]  # one row: without commit=False each call is a row of its own


def _two_process_tracker_worker(project_dir: str) -> dict[str, Any]:
    accelerator = Accelerator(log_with="all", project_dir=project_dir)
    rank = accelerator.process_index
    comet = {"online": False, "display_summary_level": 0, "auto_output_logging": False}
    accelerator.init_trackers("proj", config={"rank": rank}, init_kwargs={"comet_ml": comet})
    accelerator.log({"rank": torch.tensor(float(rank))}, step=rank)
    tracker = accelerator.get_tracker("csv")
    tracker.log_metrics({"again": 1.0}, step=5)  # on rank 1, a tracker that does nothing
    accelerator.end_training()
    return {"tracker": type(tracker).__name__}


def test_accelerator_trackers_write_on_rank_0_only(tmp_path: Path) -> None:
    ranks = run_processes(_two_process_tracker_worker, str(tmp_path), nprocs=2)
    assert ranks[0]["tracker"] == "CSVLogger" and ranks[1]["tracker"] == "_NoExperiment"
    root = tmp_path / "proj"
    assert [p.name for p in (root / "csv").iterdir()] == ["version_0"]
    assert [(r["step"], r["rank"]) for r in csv_rows(root / "csv" / "version_0" / "metrics.csv")] == [
        ("0", "0.0"),
        ("5", ""),
    ]
    assert tensorboard_scalars(root / "tensorboard" / "version_0") == {"rank": [(0, 0.0)]}
    (run_dir,) = wandb_runs(root)
    assert wandb_config(wandb_records(run_dir)) == {"rank": 0}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.data.params == {"rank": "0"} and run.data.metrics == {"rank": 0.0}
    assert len(list((root / "comet").glob("*.zip"))) == 1  # Comet's offline archive, from rank 0 only


@pytest.mark.parametrize(
    ("log_with", "message"),
    [
        (
            "neptune",
            r"log_with='neptune': 'neptune' is not a tracker\. Valid choices: 'all', 'csv', 'tensorboard', 'wandb', 'mlflow', 'comet_ml'",
        ),
        (["csv", "tb"], r"log_with=\['csv', 'tb'\]: 'tb' is not a tracker\. Valid choices"),
        (3, r"log_with=3: 3 is not a tracker"),
    ],
)
def test_bad_log_with_is_refused_in_the_constructor(log_with: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Accelerator(log_with=log_with)


def test_tracker_calls_out_of_order(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="csv", project_dir=tmp_path)
    with pytest.raises(
        RuntimeError, match=r"accelerator.log\(\) needs accelerator.init_trackers\(project_name\) first"
    ):
        accelerator.log({"loss": 1.0})
    with pytest.raises(
        ValueError,
        match=r"init_kwargs has keys \['wandb'\] that are not among this Accelerator's trackers \['csv'\]",
    ):
        accelerator.init_trackers("p", init_kwargs={"wandb": {}})
    accelerator.init_trackers("p")
    with pytest.raises(RuntimeError, match="init_trackers\\(\\) was already called"):
        accelerator.init_trackers("p")
    accelerator.end_training()
    Accelerator().log({"loss": 1.0})  # no trackers asked for: nothing to do (as in 🤗 Accelerate)


# -- the example --------------------------------------------------------------------------------------
def test_wandb_offline_example(tmp_path: Path) -> None:
    env = base_env(WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    env.pop("WANDB_MODE", None)  # the example picks offline itself
    root = tmp_path / "example"
    result = run_command([PYTHON, str(REPO / "examples" / "wandb_offline.py"), "--max-epochs", "1", "--root",
                          str(root), "--log-model"], env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = wandb_runs(root)
    assert f"(offline): {run_dir}" in result.stdout and f"wandb sync {run_dir}" in result.stdout
    records = wandb_records(run_dir)
    assert wandb_config(records) == {"hidden": 32, "lr": 0.01}
    assert {"train_loss_step", "train_loss_epoch", "val_acc", "val_loss"} <= {
        k for row in wandb_history(records) for k in row
    }
    assert len(of_type(records, "artifact")) == 1
