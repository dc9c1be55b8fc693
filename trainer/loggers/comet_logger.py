"""``CometLogger``: hyper-parameters, metrics and checkpoints in a Comet experiment."""

from __future__ import annotations

import importlib
import inspect
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from typing_extensions import override

from ember._validation import check_bool, check_str
from ember.trainer.loggers.base import _is_global_zero, _NoExperiment, _params
from ember.trainer.loggers.uploads import UploadsCheckpoints, check_log_model, checkpoint_score

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["CometLogger"]

_MODES = ("get_or_create", "get", "create")


class CometLogger(UploadsCheckpoints):
    """Log to a Comet experiment: ``hparams`` become its parameters, rows its metrics (at the
    Trainer's global step), checkpoints its models. Lightning's ``CometLogger``, for ember.

    ``online=False`` records the experiment in ``offline_directory`` (a keyword of
    ``comet_ml.ExperimentConfig``, as every other keyword argument) for a later ``comet upload``;
    ``None`` leaves it to Comet's configuration (``COMET_START_ONLINE``, ``~/.comet.config``), and
    online needs an API key. The experiment key is chosen when the logger is made (or given as
    ``experiment_key``), so a checkpoint knows it before the experiment opens; a fit resumed from
    a checkpoint continues that experiment. ``log_model=True`` uploads the checkpoints of
    ``ModelCheckpoint`` (directories) as Comet models at the end of a successful fit; ``"all"``
    uploads each as it is saved.

    The experiment opens on first use (``experiment``), on global rank 0 only, and ends in
    ``finalize``.

    Example::

        Trainer(logger=CometLogger(project="digits", online=False, offline_directory="comet"))
    """

    def __init__(self, *, api_key: str | None = None, workspace: str | None = None, project: str | None = None,
                 experiment_key: str | None = None, mode: str | None = None, online: bool | None = None,
                 prefix: str | None = None, name: str | None = None, log_model: bool | Literal["all"] = False,
                 **kwargs: Any) -> None:  # fmt: skip
        owner = "CometLogger"
        for key, value in (("api_key", api_key), ("workspace", workspace), ("project", project),
                           ("experiment_key", experiment_key), ("prefix", prefix), ("name", name)):  # fmt: skip
            check_str(key, value, owner=owner, optional=True)
        check_bool("online", online, owner=owner, optional=True)
        if mode is not None and mode not in _MODES:
            raise ValueError(
                f"CometLogger(mode={mode!r}): valid choices are None, " + ", ".join(map(repr, _MODES))
            )
        check_log_model("CometLogger", log_model)
        comet = _import_comet()
        fields = set(inspect.signature(comet.ExperimentConfig).parameters)
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(
                f"CometLogger() got unexpected keyword arguments {unknown}: the keyword arguments are "
                f"comet_ml.ExperimentConfig's: {', '.join(sorted(fields))}"
            )
        self._api_key, self._workspace, self._project = api_key, workspace, project
        self._mode, self._online, self._prefix = mode, online, prefix or ""
        self._config = {"name": name, **kwargs} if name is not None else dict(kwargs)
        self._start_uploads(log_model)
        self._chosen_key = experiment_key
        self._key = experiment_key or uuid.uuid4().hex  # Comet's form: 32 hexadecimal digits
        self._experiment: Any = None

    @property
    @override
    def name(self) -> str:
        """The Comet project (``""``: Comet's default project)."""
        return self._project or ""

    @property
    @override
    def version(self) -> str:
        """The experiment key."""
        return self._key

    @property
    def writer(self) -> Any:
        """The comet ``Experiment`` (``experiment``), under 🤗 Accelerate's tracker's name."""
        return self.experiment

    @property
    def experiment(self) -> Any:
        """The ``comet_ml`` experiment, opened on first use; on other ranks than 0 an object that does nothing."""
        if self._experiment is not None:
            return self._experiment
        if not _is_global_zero():
            return _NoExperiment()
        comet = _import_comet()
        offline = self._config.get("offline_directory")
        if offline is not None:
            Path(offline).mkdir(parents=True, exist_ok=True)
        self._experiment = comet.start(
            api_key=self._api_key,
            workspace=self._workspace,
            project=self._project,
            experiment_key=self._key,
            mode=self._mode or "get_or_create",
            online=self._online,
            experiment_config=comet.ExperimentConfig(**self._config),
        )
        return self._experiment

    @override
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.experiment.log_parameters(_params(params))  # nested dicts: Comet's own nesting (``outer|inner``)

    @override
    def log_metrics(self, metrics: dict[str, float], step: int, **kwargs: Any) -> None:
        """``kwargs`` go to the experiment's ``log_metrics`` (``epoch=``: ``accelerator.log``'s ``log_kwargs``)."""
        row = {f"{self._prefix}-{k}" if self._prefix else k: v for k, v in metrics.items()}
        self.experiment.log_metrics(row, step=step, **kwargs)

    @override
    def log_text(self, texts: dict[str, str], step: int) -> None:
        """Each string as a Comet text sample at ``step``, its name in the metadata (``{"name": ...}``)."""
        for key, text in texts.items():
            self.experiment.log_text(text, step=step, metadata={"name": key})

    @override
    def _upload_checkpoint(self, callback: ModelCheckpoint, path: str) -> None:
        """The Comet model ``<name>``, with the score and whether it is the best."""
        metadata = {"score": checkpoint_score(callback, path), "best": path == callback.best_model_path}
        self.experiment.log_model(Path(path).name, path, metadata=metadata, overwrite=True)

    @override
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        self._finish_uploads(status)
        self._experiment.log_other("status", status)
        self._experiment.end()
        self._experiment = None  # a later use (trainer.test()) continues the same experiment
        self._mode = "get"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "experiment_key": self._key,
            "project": self._project,
            "logged_checkpoints": dict(self._logged_checkpoints),
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        open_id = self._key if self._experiment is not None else None
        place, given = ("project", state["project"], self._project), ("experiment key", self._chosen_key)
        if self._resume(
            state, "Comet experiment", state["experiment_key"], place=place, given=given, open_id=open_id
        ):
            self._key = state["experiment_key"]
            self._mode = "get"


def _import_comet() -> Any:
    try:
        return importlib.import_module("comet_ml")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "CometLogger needs the comet_ml package: pip install 'ember[comet]'"
        ) from error
