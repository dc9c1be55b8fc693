"""``MLFlowLogger``: hyper-parameters, metrics and checkpoints in an MLflow run."""

from __future__ import annotations

import importlib
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from typing_extensions import override

from ember._validation import check_bool, check_path, check_str, show
from ember.trainer.loggers.base import _flatten, _is_global_zero, _NoExperiment
from ember.trainer.loggers.uploads import UploadsCheckpoints, check_log_model

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["MLFlowLogger"]

_STATUS = {"success": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_KEY = re.compile(r"[^a-zA-Z0-9_/. -]+")  # what MLflow refuses in a metric or parameter name
_PARAM_LENGTH = 6000  # MLflow's longest parameter value
_BATCH = 100  # parameters per log_batch call (MLflow's limit)


class MLFlowLogger(UploadsCheckpoints):
    """Log to an MLflow run: ``hparams`` become its parameters, rows its metrics (at the Trainer's
    global step), checkpoints its artifacts. Lightning's ``MLFlowLogger``, for ember.

    ``tracking_uri`` is where runs are recorded: ``None`` takes ``MLFLOW_TRACKING_URI`` where it is
    set, else a SQLite database ``<save_dir>/mlflow.db`` (MLflow refuses its old file store unless
    ``MLFLOW_ALLOW_FILE_STORE=true``); artifacts of a new experiment go to
    ``<save_dir>/artifacts`` unless ``artifact_location`` says otherwise. ``log_model=True`` uploads
    the checkpoints of ``ModelCheckpoint`` (directories) to ``checkpoints/<name>/`` at the end of a
    successful fit; ``"all"`` uploads each as it is saved. ``run_id`` continues an existing run.

    The run opens on first use (``experiment``), on global rank 0 only, and ends in ``finalize``
    with the fit's status (``FINISHED``, ``FAILED``, ``KILLED``). When a fit resumes from a
    checkpoint, the logger continues the checkpoint's run.

    Example::

        Trainer(logger=MLFlowLogger(experiment_name="digits", save_dir="mlruns", log_model=True))
    """

    def __init__(self, experiment_name: str = "ember_logs", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: Mapping[str, Any] | None = None,
                 save_dir: str | os.PathLike[str] = "./mlruns", log_model: bool | Literal["all"] = False,
                 prefix: str = "", artifact_location: str | None = None, run_id: str | None = None,
                 synchronous: bool | None = None) -> None:  # fmt: skip
        owner = "MLFlowLogger"
        check_str("experiment_name", experiment_name, owner=owner)
        if not experiment_name:
            raise ValueError("MLFlowLogger(experiment_name='') must name an experiment")
        for key, value in (("run_name", run_name), ("tracking_uri", tracking_uri),
                           ("artifact_location", artifact_location), ("run_id", run_id)):  # fmt: skip
            check_str(key, value, owner=owner, optional=True)
        check_path("save_dir", save_dir, owner=owner)
        check_str("prefix", prefix, owner=owner)
        check_bool("synchronous", synchronous, owner=owner, optional=True)
        if tags is not None and not (isinstance(tags, Mapping) and all(isinstance(k, str) for k in tags)):
            raise TypeError(f"MLFlowLogger(tags={show(tags)}) must be None or a dict with string keys")
        check_log_model("MLFlowLogger", log_model)
        self._experiment_name, self._run_name = experiment_name, run_name
        self._save_dir = Path(save_dir).absolute()
        self._tracking_uri = tracking_uri
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._prefix = prefix
        self._start_uploads(log_model)
        self._artifact_location, self._synchronous = artifact_location, synchronous
        self._chosen_run_id = run_id
        self._run_id: str | None = run_id
        self._experiment_id: str | None = None
        self._client: Any = None
        self._running = False  # the run is marked RUNNING (written to since it was opened)

    @property
    @override
    def name(self) -> str:
        """The experiment id (once the run is open), else the experiment's name."""
        return self._experiment_id or self._experiment_name

    @property
    @override
    def version(self) -> str:
        """The run id (the run is opened to know it)."""
        if self._run_id is None:
            self.experiment  # noqa: B018  (opens the run, which chooses the id)
        return self._run_id or ""

    @property
    def run_id(self) -> str | None:
        return self.version or None

    @property
    def experiment_id(self) -> str | None:
        self.experiment  # noqa: B018
        return self._experiment_id

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def active_run(self) -> Any:
        """The run as an ``mlflow.ActiveRun`` (🤗 Accelerate's tracker's ``active_run``: ``.info.run_id``,
        ``.data``), read now; the logger logs through ``experiment``, an ``MlflowClient``. On other
        ranks than 0 an object that does nothing."""
        client = self.experiment
        if isinstance(client, _NoExperiment):
            return client
        return _import_mlflow().ActiveRun(client.get_run(self.run_id))

    @property
    def tracking_uri(self) -> str:
        """Where the runs are recorded (see the class description for the default)."""
        if self._tracking_uri is not None:
            return self._tracking_uri
        mlflow = _import_mlflow()
        if mlflow.environment_variables.MLFLOW_TRACKING_URI.is_set():
            return str(mlflow.environment_variables.MLFLOW_TRACKING_URI.get())
        return f"sqlite:///{self._save_dir / 'mlflow.db'}"

    @property
    def experiment(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` of the open run (``run_id``); on other ranks than 0
        an object that does nothing."""
        if self._client is not None:
            return self._client
        if not _is_global_zero():
            return _NoExperiment()
        mlflow = _import_mlflow()
        self._save_dir.mkdir(parents=True, exist_ok=True)
        client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
        if self._run_id is not None:  # continue a run: given, or the checkpoint's
            run = client.get_run(self._run_id)
            self._experiment_id = run.info.experiment_id  # (RUNNING again at its first write: _writer)
        else:
            found = client.get_experiment_by_name(self._experiment_name)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                location = self._artifact_location or (self._save_dir / "artifacts").as_uri()
                self._experiment_id = client.create_experiment(
                    self._experiment_name, artifact_location=location
                )
            tags = dict(self._tags)
            if self._run_name is not None:
                tags["mlflow.runName"] = self._run_name
            run = client.create_run(self._experiment_id, run_name=self._run_name, tags=tags)
            self._run_id = run.info.run_id
            self._running = True
        self._client = client
        return client

    def _writer(self) -> Any:
        """``experiment``, with the run marked RUNNING again if it had ended: only a write re-opens a
        finished run (``trainer.test()`` after fit, a resumed fit), never reading it back."""
        client = self.experiment
        if not self._running and not isinstance(client, _NoExperiment):
            client.update_run(self.version, status="RUNNING")
            self._running = True
        return client

    @override
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        entities = _import_mlflow().entities
        flat = {_key(k): str(v)[:_PARAM_LENGTH] for k, v in _flatten(params).items()}
        items = [entities.Param(k, v) for k, v in flat.items()]
        client = self._writer()
        for start in range(0, len(items), _BATCH):
            client.log_batch(self.version, params=items[start : start + _BATCH], **self._sync())

    @override
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        entities = _import_mlflow().entities
        now = int(time.time() * 1000)
        prefix = f"{self._prefix}-" if self._prefix else ""
        rows = [entities.Metric(_key(prefix + k), float(v), now, step) for k, v in metrics.items()]
        self._writer().log_batch(self.version, metrics=rows, **self._sync())

    @override
    def log_text(self, texts: dict[str, str], step: int) -> None:
        """Each string as the artifact ``text/<name>/step_<step>.txt`` (an MLflow metric is a number)."""
        client = self._writer()
        for key, text in texts.items():
            client.log_text(self.version, text, f"text/{_key(key)}/step_{step}.txt")

    @override
    def _upload_checkpoint(self, callback: ModelCheckpoint, path: str) -> None:
        """The run's artifacts ``checkpoints/<name>/``."""
        self._writer().log_artifacts(self.version, path, f"checkpoints/{Path(path).name}")

    @override
    def finalize(self, status: str) -> None:
        if self._client is None:
            return
        self._finish_uploads(status)
        self._client.set_terminated(self.version, status=_STATUS.get(status, "FAILED"))
        self._client, self._running = None, False  # a later use (trainer.test()) continues the same run

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "run_id": self._run_id,
            "experiment_name": self._experiment_name,
            "logged_checkpoints": dict(self._logged_checkpoints),
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["run_id"] is None:
            return
        open_id = self._run_id if self._client is not None else None
        place = ("experiment", state["experiment_name"], self._experiment_name)
        given = ("run id", self._chosen_run_id)
        if self._resume(state, "MLflow run", state["run_id"], place=place, given=given, open_id=open_id):
            self._run_id = state["run_id"]

    def _sync(self) -> dict[str, Any]:
        return {} if self._synchronous is None else {"synchronous": self._synchronous}


def _key(name: str) -> str:
    """``name`` with the characters MLflow refuses removed (a warning says so)."""
    clean = _KEY.sub("", name)
    if clean != name:
        warnings.warn(
            f"MLflow keys may hold letters, digits, '_', '/', '.', ' ' and '-' only: {name!r} is logged as {clean!r}",
            stacklevel=3,
        )
    return clean


def _import_mlflow() -> Any:
    try:
        mlflow = importlib.import_module("mlflow")
        importlib.import_module("mlflow.tracking")
        importlib.import_module("mlflow.entities")
        importlib.import_module("mlflow.environment_variables")
        return mlflow
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "MLFlowLogger needs the mlflow package: pip install 'ember[mlflow]'"
        ) from error
