"""``WandbLogger``: hyper-parameters, metrics and checkpoints in a Weights & Biases run."""

from __future__ import annotations

import importlib
import os
import secrets
import string
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from typing_extensions import override

from ember._validation import check_bool, check_path, check_str, show
from ember.trainer.loggers.base import _is_global_zero, _NoExperiment, _params
from ember.trainer.loggers.uploads import UploadsCheckpoints, check_log_model, checkpoint_score

if TYPE_CHECKING:
    from torch import nn

    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["WandbLogger"]

#: Every row carries the Trainer's global step under this name, and W&B plots all metrics against it.
STEP_METRIC = "trainer/global_step"
_EXIT_CODES = {"success": 0, "failed": 1, "interrupted": 130}
_ID_CHARACTERS = string.ascii_lowercase + string.digits
# Runs a WandbLogger kept open after a successful stage. W&B has one active run per process: a
# WandbLogger that opens its own finishes a kept one first (any other active run, a sweep agent's,
# it logs to). Weak: the active run is held by wandb itself.
_KEPT: weakref.WeakSet[Any] = weakref.WeakSet()


class WandbLogger(UploadsCheckpoints):
    """Log to a W&B run: ``hparams`` go to ``run.config``, rows to ``run.log``, checkpoints to artifacts.

    W&B's own step must only grow, but a resumed fit logs its steps again: each row carries the
    Trainer's global step as the metric ``trainer/global_step`` instead, and every metric is plotted
    against it (``define_metric``), so a resumed run's rows land at the right x. ``log_model=True``
    uploads the checkpoints of ``ModelCheckpoint`` as artifacts of type ``"model"`` at the end of a
    successful fit; ``"all"`` uploads each as it is saved. ``offline=True`` writes the run under
    ``<save_dir>/wandb/`` for a later ``wandb sync``.

    The run opens on first use (``experiment``), on global rank 0 only. As Lightning's, it stays open
    after a successful fit, validate, test or predict, so the logger's next stage logs to the same run
    (offline: the same directory); it finishes when the process exits, when another ``WandbLogger``
    opens a run, or at ``Accelerator.end_training()``. A failed or interrupted stage finishes it with
    exit code 1 or 130 (a later use re-opens the same run id). When a fit resumes from a checkpoint,
    the logger continues the checkpoint's run (same id).

    Example::

        Trainer(logger=WandbLogger(project="digits", log_model=True))
    """

    def __init__(self, project: str | None = None, name: str | None = None, save_dir: str | os.PathLike[str] = ".",
                 version: str | None = None, offline: bool = False, log_model: bool | Literal["all"] = False,
                 prefix: str = "", entity: str | None = None, tags: Sequence[str] | None = None,
                 group: str | None = None, *, id: str | None = None, dir: str | os.PathLike[str] | None = None,
                 checkpoint_name: str | None = None, **init_kwargs: Any) -> None:  # fmt: skip
        if dir is not None:  # Lightning's other name for save_dir
            check_path("dir", dir, owner="WandbLogger")
            if os.fspath(save_dir) not in (".", os.fspath(dir)):
                raise ValueError(
                    f"WandbLogger(save_dir={show(save_dir)}, dir={show(dir)}): pass one directory, not two"
                )
            save_dir = dir
        check_path("save_dir", save_dir, owner="WandbLogger")
        for key, value in (("project", project), ("name", name), ("version", version), ("entity", entity),
                           ("group", group), ("id", id), ("checkpoint_name", checkpoint_name)):  # fmt: skip
            check_str(key, value, owner="WandbLogger", optional=True)
        check_bool("offline", offline, owner="WandbLogger")
        if offline and init_kwargs.get("mode", "offline") != "offline":
            raise ValueError(
                f"WandbLogger(offline=True, mode={show(init_kwargs['mode'])}): offline=True is mode='offline'"
            )
        check_str("prefix", prefix, owner="WandbLogger")
        if tags is not None and (
            not isinstance(tags, (list, tuple)) or not all(isinstance(tag, str) for tag in tags)
        ):
            raise TypeError(f"WandbLogger(tags={show(tags)}) must be None or a list of strings")
        check_log_model("WandbLogger", log_model)
        if version is not None and id is not None and version != id:
            raise ValueError(f"WandbLogger(version={version!r}, id={id!r}): pass one run id, not two")
        self._project, self._run_name, self._save_dir = project, name, Path(save_dir)
        self._chosen_id = version if version is not None else id
        # Chosen now, so the run id is known (and saved in checkpoints) before the run opens.
        self._id = self._chosen_id or "".join(secrets.choice(_ID_CHARACTERS) for _ in range(8))
        self._offline, self._prefix, self._checkpoint_name = offline, prefix, checkpoint_name
        self._start_uploads(log_model)
        self._init_kwargs = {
            "entity": entity,
            "tags": list(tags) if tags else None,
            "group": group,
            **init_kwargs,
        }
        self._experiment: Any = None
        self._kept = False  # the run stays open after a successful stage, for the next one
        self._run_dir: str | None = None
        self._run_project: str | None = None
        self._owns_run = (
            True  # False for a run opened before the logger (a sweep agent's): not ours to finish
        )

    @property
    @override
    def name(self) -> str:
        """The W&B project (as the run reports it once open)."""
        return self._run_project or self._project or ""

    @property
    @override
    def version(self) -> str:
        """The run id."""
        return self._id

    @property
    @override
    def log_dir(self) -> str:
        """The run's local directory (``<save_dir>/wandb/<offline->run-<time>-<id>``), or ``save_dir``
        before the run opens."""
        return self._run_dir or str(self._save_dir)

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def run(self) -> Any:
        """The wandb run (``experiment``), under 🤗 Accelerate's tracker's name."""
        return self.experiment

    @property
    def experiment(self) -> Any:
        """The ``wandb`` run, opened on first use; on other ranks than 0 an object that does nothing."""
        if self._experiment is not None and not getattr(self._experiment, "_is_finished", False):
            return self._experiment  # (finished by the user or by another WandbLogger: re-opened below)
        if not _is_global_zero():
            return _NoExperiment()
        wandb = _import_wandb()
        if wandb.run is not None and wandb.run in _KEPT:  # another WandbLogger's run, kept after its stage
            wandb.run.finish(exit_code=0)
        self._owns_run, self._kept = wandb.run is None, False
        if not self._owns_run:  # e.g. a sweep agent opened it: log there, as Lightning does
            warnings.warn(
                f"a W&B run is already active (id {wandb.run.id}); WandbLogger logs to it", stacklevel=2
            )
            run = wandb.run
        else:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            settings: dict[str, Any] = {"mode": "offline"} if self._offline else {}
            # init_kwargs win over the defaults (resume="never", as Lightning lets them)
            init = {"resume": "allow", **settings, **self._init_kwargs}
            run = wandb.init(project=self._project, name=self._run_name, dir=str(self._save_dir), id=self._id,
                             **init)  # fmt: skip
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        self._experiment, self._id = run, run.id
        self._run_dir, self._run_project = str(Path(run.dir).parent), str(run.project)
        return run

    @override
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.experiment.config.update(_params(params), allow_val_change=True)

    @override
    def log_metrics(self, metrics: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        """``kwargs`` go to ``wandb.Run.log`` (``commit=False``: ``accelerator.log``'s ``log_kwargs``);
        ``step=None``: W&B's own step (Lightning's ``log_table``/``log_image`` without one)."""
        row = {f"{self._prefix}-{k}" if self._prefix else k: v for k, v in metrics.items()}
        self.experiment.log({**row, STEP_METRIC: step} if step is not None else row, **kwargs)

    @override
    def log_text(self, texts: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """``log_text({name: text}, step)`` (ember's, from ``accelerator.log``): strings in the history;
        ``log_text(key, columns=None, data=None, dataframe=None, step=None)``: Lightning's, a table."""
        if isinstance(texts, str):
            self.log_table(texts, *args, **kwargs)
            return
        self.log_metrics(texts, *args, **kwargs)  # (a W&B history field takes strings)

    def log_table(self, key: str, columns: list[Any] | None = None, data: list[list[Any]] | None = None,
                  dataframe: Any = None, step: int | None = None) -> None:  # fmt: skip
        """A ``wandb.Table`` under ``key`` (Lightning's): ``columns`` and rows of ``data``, or a pandas
        ``dataframe``."""
        if _is_global_zero():
            import wandb

            self.log_metrics({key: wandb.Table(columns=columns, data=data, dataframe=dataframe)}, step)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: list[Any]) -> None:
        """``wandb.Image``s under ``key`` (Lightning's): ``images`` a list (tensors, arrays, PIL images or
        paths); each keyword a list of the same length, one value per image (``caption=[...]``)."""
        if not isinstance(images, list):
            raise TypeError(f"log_image(images=...) takes a list, got {type(images).__name__}")
        for name, values in kwargs.items():
            if not isinstance(values, list) or len(values) != len(images):
                raise ValueError(f"log_image({name}=...) needs a list of {len(images)} values, one per image")
        if _is_global_zero():
            import wandb

            per_image = [{name: values[i] for name, values in kwargs.items()} for i in range(len(images))]
            self.log_metrics(
                {key: [wandb.Image(image, **extra) for image, extra in zip(images, per_image, strict=True)]},
                step,
            )

    def watch(self, model: nn.Module, log: str | None = "gradients", log_freq: int = 100,
              log_graph: bool = True) -> None:  # fmt: skip
        """Let W&B record the model's gradients (and parameters with ``log="all"``) every ``log_freq`` steps."""
        self.experiment.watch(model, log=log, log_freq=log_freq, log_graph=log_graph)

    @override
    def _upload_checkpoint(self, callback: ModelCheckpoint, path: str) -> None:
        """A new version of the artifact ``checkpoint_name`` (default ``model-<run id>``, type ``"model"``)."""
        run = self.experiment
        settings = {
            key: getattr(callback, key)
            for key in ("monitor", "mode", "save_top_k", "save_last", "every_n_train_steps", "every_n_epochs")
        }
        score = checkpoint_score(callback, path)
        metadata = {"original_filename": Path(path).name, "score": score, "ModelCheckpoint": settings}
        artifact = _import_wandb().Artifact(
            name=self._checkpoint_name or f"model-{run.id}", type="model", metadata=metadata
        )
        artifact.add_dir(path)  # a checkpoint is a directory; W&B copies it before it may be pruned
        aliases = ["latest", "best"] if path == callback.best_model_path else ["latest"]
        run.log_artifact(artifact, aliases=aliases)

    @override
    def finalize(self, status: str) -> None:
        """Upload checkpoints; keep the run open after a success (Lightning's: the next stage logs to
        it), else finish it with the failure's exit code."""
        if self._experiment is None:
            return
        self._finish_uploads(status)
        if status != "success":
            self._finish(status)
        elif self._owns_run:
            self._kept = True
            _KEPT.add(self._experiment)

    @override
    def finish(self) -> None:
        """Finalize, then finish the run kept open between stages (``Accelerator.end_training()``)."""
        super().finish()
        self._finish("success")

    def _finish(self, status: str) -> None:
        """Finish this logger's own run (``Accelerator.end_training()``, a failed stage); a later use
        re-opens the same run id."""
        if (
            self._experiment is not None
            and self._owns_run
            and not getattr(self._experiment, "_is_finished", False)
        ):
            self._experiment.finish(exit_code=_EXIT_CODES.get(status, 1))
        self._experiment, self._kept = None, False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "project": self._project,
            "logged_checkpoints": dict(self._logged_checkpoints),
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A run kept open after an earlier stage does not hold the logger: it switches to the checkpoint's.
        open_id = self._id if self._experiment is not None and not self._kept else None
        place, given = ("project", state["project"], self._project), ("run id", self._chosen_id)
        if self._resume(state, "W&B run", state["id"], place=place, given=given, open_id=open_id):
            if state["id"] != self._id:
                self._finish("success")
            self._id = state["id"]


def _import_wandb() -> Any:
    try:
        return importlib.import_module("wandb")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "WandbLogger needs the wandb package: pip install 'ember[wandb]'"
        ) from error
