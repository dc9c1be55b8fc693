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
from ember.trainer.loggers.base import VersionedLogger, _check_version, _is_global_zero

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

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

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


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # a user's own log_metrics call (the Trainer passes floats)
        value = value.item()
    return repr(value) if isinstance(value, float) else value
