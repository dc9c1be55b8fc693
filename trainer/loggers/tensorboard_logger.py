"""``TensorBoardLogger``: ``<save_dir>/<name>/version_N/`` event files (scalars and hyper-parameters)."""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember._validation import check_bool, check_path, check_str, show
from ember.trainer.loggers.base import (
    VersionedLogger,
    _check_version,
    _flatten,
    _is_global_zero,
    _NoExperiment,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TensorBoardLogger"]

#: ``SummaryWriter``'s arguments a user may pass (the logger sets ``log_dir`` and ``purge_step``).
_WRITER_ARGUMENTS = ("comment", "filename_suffix", "flush_secs", "max_queue")


class TensorBoardLogger(VersionedLogger):
    """Scalars for TensorBoard, through ``torch.utils.tensorboard.SummaryWriter``.

    Each metric is a scalar at the Trainer's global step. The hyper-parameters go to
    ``hparams.json`` and to TensorBoard's HParams tab, where every logged scalar is a metric
    column. The version is the next free ``version_N`` unless given. When a fit resumes from a
    checkpoint whose run logged to this logger's directory, the logger continues that version: the
    values the interrupted run logged after the checkpoint are purged from TensorBoard's view, so
    the charts read as if the run never stopped. ``writer_kwargs`` go to ``SummaryWriter``
    (``flush_secs``, ``max_queue`` ...). As Lightning's: ``sub_dir`` puts the files in a folder of the
    version's, ``log_graph=True`` adds the module's graph (traced with ``example_input_array``), and
    ``default_hp_metric=True`` logs ``hp_metric`` = -1 with the hyper-parameters (Lightning's default).

    Example::

        Trainer(logger=TensorBoardLogger("runs", name="digits"))  # tensorboard --logdir runs/digits
    """

    def __init__(self, save_dir: str | os.PathLike[str] = ".", name: str = "tensorboard",
                 version: int | str | None = None, prefix: str = "", *,
                 sub_dir: str | os.PathLike[str] | None = None, log_graph: bool = False,
                 default_hp_metric: bool = False, **writer_kwargs: Any) -> None:  # fmt: skip
        check_path("save_dir", save_dir, owner="TensorBoardLogger")
        check_str("name", name, owner="TensorBoardLogger")
        _check_version(version, "TensorBoardLogger")
        check_str("prefix", prefix, owner="TensorBoardLogger")
        check_path("sub_dir", sub_dir, owner="TensorBoardLogger", optional=True)
        check_bool("log_graph", log_graph, owner="TensorBoardLogger")
        check_bool("default_hp_metric", default_hp_metric, owner="TensorBoardLogger")
        for key, value in writer_kwargs.items():  # checked now: SummaryWriter is only made at the first write
            if key not in _WRITER_ARGUMENTS:
                raise TypeError(
                    f"TensorBoardLogger({key}={show(value)}) is not an argument of TensorBoardLogger nor of "
                    f"SummaryWriter. Valid choices: {', '.join(_WRITER_ARGUMENTS)}"
                )
        self._save_dir, self._name, self._version = Path(save_dir), name, version
        self._given_version = version
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._prefix, self._writer_kwargs, self._log_graph = prefix, writer_kwargs, log_graph
        self._default_hp_metric = default_hp_metric
        self._hparams: dict[str, Any] = {}
        self._experiment: Any = None
        # The values of the newest step: a resumed run purges that step and writes them again.
        self._last_step = -1
        self._last_row: list[tuple[str, float]] = []
        self._purge_step: int | None = None

    @property
    def sub_dir(self) -> str | None:
        """The folder in each version's folder that the files go to (``log_dir``), or None: the version's."""
        return self._sub_dir

    @override
    def _log_dir_of(self, version: int | str) -> Path:
        folder = super()._log_dir_of(version)
        return folder if self._sub_dir is None else folder / self._sub_dir

    @property
    def experiment(self) -> Any:
        """The ``SummaryWriter``, created on first use; on other ranks than 0 an object that does nothing."""
        if self._experiment is not None:
            return self._experiment
        if not _is_global_zero():
            return _NoExperiment()
        try:
            tensorboard = importlib.import_module("torch.utils.tensorboard")
        except ImportError as error:
            raise ModuleNotFoundError(
                "TensorBoardLogger needs the tensorboard package: pip install 'ember[tensorboard]'"
            ) from error
        writer = tensorboard.SummaryWriter(self.log_dir, purge_step=self._purge_step, **self._writer_kwargs)
        if self._purge_step is not None:  # TensorBoard hides everything from this step on: restore its start
            for tag, value in self._last_row:
                writer.add_scalar(tag, value, global_step=self._purge_step)
            self._purge_step = None
        self._experiment = writer
        return writer

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (``experiment``), under 🤗 Accelerate's tracker's name."""
        return self.experiment

    @override
    def log_hyperparams(self, params: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """``metrics`` (Lightning's argument, e.g. ``{"hp/accuracy": 0}``) are logged as scalars at step 0;
        without them, ``default_hp_metric=True`` logs ``{"hp_metric": -1}`` (Lightning's default)."""
        if not _is_global_zero():
            return
        self._write_hparams(params)
        summary = importlib.import_module("torch.utils.tensorboard.summary")
        values = {k: _hparam(v) for k, v in _flatten(params).items() if v is not None}
        # Only the session's start (its hyper-parameters): without an experiment summary, the HParams
        # tab takes every scalar of the run as a metric, so no metric needs naming up front.
        _, session_start, _ = summary.hparams(values, {})
        self.experiment.file_writer.add_summary(session_start)
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        if metrics:
            self.log_metrics(metrics, 0)

    @override
    def log_graph(self, model: nn.Module, input_array: Any = None) -> None:
        """With ``log_graph=True``: ``model``'s graph, traced (``add_graph``) with ``input_array``, else its
        ``example_input_array`` (a tensor or a tuple of positional arguments), through its batch-transfer hooks."""
        if not self._log_graph or not _is_global_zero():
            return
        example = getattr(model, "example_input_array", None) if input_array is None else input_array
        if not isinstance(example, (torch.Tensor, tuple)):
            warnings.warn(
                f"TensorBoardLogger(log_graph=True) cannot trace the graph of {type(model).__name__}: "
                f"example_input_array (or input_array) is {type(example).__name__}, not a tensor or a tuple "
                "of forward's positional arguments",
                stacklevel=2,
            )
            return
        from ember.trainer.module_tools import ModuleTools, _scripting

        if isinstance(model, ModuleTools):
            example = model._example_on_device(example, "log_graph")
        with _scripting():
            self.experiment.add_graph(model, example)

    @override
    def log_metrics(self, metrics: dict[str, float], step: int, **kwargs: Any) -> None:
        """``kwargs`` go to ``SummaryWriter.add_scalar`` (``walltime=``: ``accelerator.log``'s ``log_kwargs``)."""
        writer = self.experiment
        if step != self._last_step:
            self._last_step, self._last_row = step, []
        for key, value in metrics.items():
            tag = f"{self._prefix}-{key}" if self._prefix else key
            writer.add_scalar(tag, value, global_step=step, **kwargs)
            self._last_row.append((tag, value))

    @override
    def log_text(self, texts: dict[str, str], step: int, **kwargs: Any) -> None:
        for key, value in texts.items():
            self.experiment.add_text(
                f"{self._prefix}-{key}" if self._prefix else key, value, global_step=step, **kwargs
            )

    @override
    def save(self) -> None:
        if self._experiment is not None:
            self._experiment.flush()

    @override
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None  # a later use appends a new event file to the same version

    @override
    def state_dict(self) -> dict[str, Any]:
        self.save()
        return {
            "version": self.version,
            "log_dir": str(Path(self.log_dir).resolve()),
            "step": self._last_step,
            "row": [list(pair) for pair in self._last_row],
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._continues(state):
            return
        version = state["version"]
        if self._experiment is not None:
            self.finalize("success")
        self._version = version
        self._last_step, self._last_row = state["step"], [(tag, value) for tag, value in state["row"]]
        # Steps from the checkpoint's on are hidden (the interrupted run logged them, this one logs them
        # again); the values logged at the checkpoint's own step before it was saved are written back.
        self._purge_step = max(self._last_step, 0)


def _hparam(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)
