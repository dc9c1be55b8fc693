"""``CSVLogger``: ``<save_dir>/<name>/version_N/metrics.csv`` and ``hparams.json``."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from ember._validation import check_int, check_path, check_str
from ember.trainer.loggers.base import VersionedLogger, _check_version, _is_global_zero, _NoExperiment

__all__ = ["CSVLogger"]


class CSVLogger(VersionedLogger):
    """Metric rows in a CSV file, one column per metric (the default logger).

    The version is the next free ``version_N`` unless given. When a fit resumes from a checkpoint
    whose run logged to this logger's directory, the logger continues that run's file: rows written
    after the checkpoint (by the interrupted run) are dropped, so the file reads as if the run never
    stopped. A checkpoint from a run that logged elsewhere starts a new version.

    Example::

        Trainer(logger=CSVLogger("runs", name="digits"))
    """

    def __init__(self, save_dir: str | os.PathLike[str] = ".", name: str | None = "logs",
                 version: int | str | None = None, flush_every_n_rows: int = 100, prefix: str = "", *,
                 flush_logs_every_n_steps: int | None = None) -> None:  # fmt: skip
        check_path("save_dir", save_dir, owner="CSVLogger")
        check_str("name", name, owner="CSVLogger", optional=True)
        _check_version(version, "CSVLogger")
        check_int("flush_every_n_rows", flush_every_n_rows, minimum=1, owner="CSVLogger")
        check_str("prefix", prefix, owner="CSVLogger")
        if flush_logs_every_n_steps is not None:  # Lightning's name for it
            check_int("flush_logs_every_n_steps", flush_logs_every_n_steps, minimum=1, owner="CSVLogger")
            if flush_every_n_rows not in (100, flush_logs_every_n_steps):
                raise ValueError(
                    f"CSVLogger(flush_every_n_rows={flush_every_n_rows}, flush_logs_every_n_steps="
                    f"{flush_logs_every_n_steps}): give one of the two"
                )
            flush_every_n_rows = flush_logs_every_n_steps
        self._save_dir = Path(save_dir)
        self._name = name or ""  # (None, as Lightning: the versions directly in save_dir)
        self._prefix = prefix
        self._version = self._given_version = version
        self._flush_every = flush_every_n_rows
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = []
        self._rows_written = 0
        self._hparams: dict[str, Any] = {}
        self._experiment: _CSVWriter | None = None

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    @property
    def experiment(self) -> Any:
        """The writer behind the logger, as Lightning's (``self.logger.experiment.log_metrics(...)``);
        on other ranks than 0 an object that does nothing."""
        if not _is_global_zero():
            return _NoExperiment()
        if self._experiment is None:
            self._experiment = _CSVWriter(self)
        return self._experiment

    @property
    @override
    def tracker(self) -> Any:
        """The logger itself (🤗 Accelerate has no CSV tracker to unwrap to)."""
        return self

    @override
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        if not _is_global_zero():  # (a user's call from a hook on every rank: rank 0's files only)
            return
        self._write_hparams(params)

    @override
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not _is_global_zero():
            return
        if self._prefix:  # (Lightning's "<prefix>-<name>" columns)
            metrics = {f"{self._prefix}-{key}": value for key, value in metrics.items()}
        self._append(metrics, step)

    def _append(self, metrics: dict[str, Any], step: int) -> None:
        self._rows.append({"step": step, **metrics})
        if len(self._rows) >= self._flush_every:
            self.save()

    @override
    def log_text(self, texts: dict[str, str], step: int) -> None:
        last = self._rows[-1] if self._rows else None
        if last is not None and last["step"] == step and not texts.keys() & last.keys():
            last.update(texts)  # the same step's numbers, just logged: one row
        else:
            self.log_metrics(texts, step)  # type: ignore[arg-type]  # (a CSV cell holds a string as well)

    @override
    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        path.parent.mkdir(parents=True, exist_ok=True)
        new_columns = [k for row in self._rows for k in row if k not in self._columns]
        if new_columns or not path.exists():
            # A new metric appeared: rewrite the file with the wider header (old rows keep blanks). The
            # file may have columns this logger never logged (an earlier run given the same version).
            old = self._read_rows(path)
            self._columns += list(
                dict.fromkeys(k for row in old + self._rows for k in row if k not in self._columns)
            )
            self._write(path, old + self._rows, mode="w")
        else:
            self._write(path, self._rows, mode="a")
        self._rows_written += len(self._rows)
        self._rows = []

    def _write(self, path: Path, rows: list[dict[str, Any]], mode: str) -> None:
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if mode == "w":
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})

    @staticmethod
    def _read_rows(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @override
    def state_dict(self) -> dict[str, Any]:
        self.save()
        return {
            "version": self.version,
            "rows": self._rows_written,
            "columns": list(self._columns),
            "log_dir": str(Path(self.log_dir).resolve()),
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._continues(state):
            return
        self._version = state["version"]
        self._columns = list(state["columns"])
        self._rows = []
        path = self.metrics_file
        rows = self._read_rows(path)
        if len(rows) < state["rows"]:
            warnings.warn(
                f"{path} has {len(rows)} rows, the checkpoint expected {state['rows']}", stacklevel=2
            )
        kept = rows[: state["rows"]]
        if kept or self._columns:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".metrics.csv.tmp")
            with open(tmp, "w", newline="") as f:
                # Columns that appeared after the checkpoint are empty in the rows kept: drop them.
                writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)
        self._rows_written = len(kept)


class _CSVWriter:
    """``CSVLogger.experiment`` (Lightning's ``ExperimentWriter``): its calls write the logger's rows and
    ``hparams.json``, without the logger's ``prefix`` (as Lightning's)."""

    def __init__(self, logger: CSVLogger) -> None:
        self._logger = logger

    @property
    def log_dir(self) -> str:
        return self._logger.log_dir

    @property
    def metrics_file_path(self) -> str:
        return str(self._logger.metrics_file)

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters ``hparams.json`` holds."""
        return self._logger._hparams

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows not written yet."""
        return self._logger._rows

    def log_hparams(self, params: dict[str, Any]) -> None:
        self._logger._write_hparams(params)

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        """One row at ``step`` (default: the row's index in the file)."""
        if step is None:
            step = self._logger._rows_written + len(self._logger._rows)
        self._logger._append(dict(metrics_dict), step)

    def save(self) -> None:
        self._logger.save()


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # a user's own log_metrics call (the Trainer passes floats)
        value = value.item()
    return repr(value) if isinstance(value, float) else value
