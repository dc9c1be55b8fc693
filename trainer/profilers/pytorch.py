""":class:`PyTorchProfiler`: ``torch.profiler`` over the steps: operators, a chrome trace
(``profiler="pytorch"``)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_bool, check_int, show
from ember.trainer.profilers.base import Profiler

__all__ = ["PyTorchProfiler"]


class PyTorchProfiler(Profiler):
    """``torch.profiler.profile`` from the stage's first ``*_step`` to its end: the report is the
    table of ``key_averages()`` (torch operators and the Trainer's actions, each a
    ``record_function``), and the timeline is written as a chrome trace
    (``{dirpath}/{stage}[-{filename}][-{rank}].pt.trace.json``, open it in ``chrome://tracing`` or
    Perfetto).

    Activities: the CPU, and CUDA when it is available. Everything from the first step on is
    recorded: for a long run, limit the batches, or pass ``schedule=torch.profiler.schedule(...)``:
    the profiler then steps after each ``*_step`` and writes one trace per recorded window
    (``...{step}.pt.trace.json``).

    Example::

        trainer = Trainer(profiler=PyTorchProfiler(record_shapes=True, row_limit=30), max_steps=20)

    Args:
        dirpath: the directory of the report and trace (see :class:`Profiler`).
        filename: with it, each process writes its report to a file instead of rank 0 printing it.
        group_by_input_shapes: one row per operator and input shapes (needs ``record_shapes=True``).
        export_to_chrome: write the chrome trace.
        row_limit: rows of the table (``-1``: all).
        sort_by_key: the table's order: a ``key_averages()`` column such as ``"cpu_time_total"``
            (the default without CUDA) or ``"device_time_total"`` (with it).
        table_kwargs: more arguments of ``EventList.table`` (``max_name_column_width`` ...).
        **profiler_kwargs: arguments of ``torch.profiler.profile`` (``record_shapes``,
            ``profile_memory``, ``with_stack``, ``activities``, ``schedule``, ``on_trace_ready`` ...).
    """

    STEP_FUNCTIONS = ("training_step", "validation_step", "test_step", "predict_step")
    SORT_KEYS = frozenset({
        "count", "cpu_time", "cpu_time_total", "self_cpu_time_total", "cuda_time", "cuda_time_total",
        "self_cuda_time_total", "device_time", "device_time_total", "self_device_time_total",
        "cpu_memory_usage", "self_cpu_memory_usage", "cuda_memory_usage", "self_cuda_memory_usage",
        "device_memory_usage", "self_device_memory_usage",
    })  # fmt: skip

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        group_by_input_shapes: bool = False,
        export_to_chrome: bool = True,
        row_limit: int = 20,
        sort_by_key: str | None = None,
        table_kwargs: dict[str, Any] | None = None,
        **profiler_kwargs: Any,
    ) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        check_bool("group_by_input_shapes", group_by_input_shapes, owner="PyTorchProfiler")
        check_bool("export_to_chrome", export_to_chrome, owner="PyTorchProfiler")
        check_int("row_limit", row_limit, minimum=-1, owner="PyTorchProfiler")
        accepted = inspect.signature(torch.profiler.profile).parameters
        unknown = sorted(set(profiler_kwargs) - set(accepted))
        if unknown:  # (else the first step would fail, inside the fit)
            raise ValueError(
                f"PyTorchProfiler got {', '.join(unknown)}, which torch.profiler.profile does not take: "
                f"{', '.join(accepted)}"
            )
        if "activities" not in profiler_kwargs:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler_kwargs["activities"] = activities
        on_device = torch.profiler.ProfilerActivity.CUDA in profiler_kwargs["activities"]
        sort_by_key = sort_by_key or ("device_time_total" if on_device else "cpu_time_total")
        if sort_by_key not in self.SORT_KEYS:
            raise ValueError(
                f"PyTorchProfiler(sort_by_key={show(sort_by_key)}). Valid choices: {', '.join(sorted(self.SORT_KEYS))}"
            )
        table_kwargs = dict(table_kwargs or {})
        if {"sort_by", "row_limit"} & table_kwargs.keys():
            raise ValueError("PyTorchProfiler(table_kwargs=...) takes neither sort_by nor row_limit: pass "
                             "sort_by_key= and row_limit=")  # fmt: skip
        self.group_by_input_shapes = group_by_input_shapes and bool(profiler_kwargs.get("record_shapes"))
        self.export_to_chrome = export_to_chrome
        self.row_limit = row_limit
        self.sort_by_key = sort_by_key
        self.table_kwargs = table_kwargs
        self.profiler_kwargs = profiler_kwargs
        self.profiler: torch.profiler.profile | None = None  # while it records
        self.averages: Any = None  # key_averages() of the stage, once it ended
        self.trace_paths: list[str] = []  # the chrome traces written in this stage
        self._records: dict[str, list[Any]] = {}  # running action -> its open record_function(s)

    @classmethod
    @override
    def register_profilers(cls, registry: Registry[Profiler]) -> None:
        registry.register("pytorch", cls, "torch.profiler over the steps: operator table and chrome trace")

    @override
    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        super().setup(stage, local_rank, log_dir)
        self._finish(keep=False)
        self.averages, self.trace_paths = None, []

    @override
    def start(self, action_name: str) -> None:
        if self.profiler is None and action_name.endswith(self.STEP_FUNCTIONS) and self.averages is None:
            self.profiler = self._new_profiler()
            self.profiler.start()
        if self.profiler is not None:
            record = torch.profiler.record_function(action_name)
            record.__enter__()
            self._records.setdefault(action_name, []).append(record)

    @override
    def stop(self, action_name: str) -> None:
        records = self._records.get(action_name)
        if records:
            records.pop().__exit__(None, None, None)
        if (
            self.profiler is not None
            and "schedule" in self.profiler_kwargs
            and action_name.endswith(self.STEP_FUNCTIONS)
        ):
            self.profiler.step()

    @override
    def summary(self) -> str:
        self._finish(keep=True)
        if not self.averages:
            return ""
        table = self.averages.table(sort_by=self.sort_by_key, row_limit=self.row_limit, **self.table_kwargs)
        return self._sections({"records": table})

    @override
    def teardown(self, stage: str | None) -> None:
        self._finish(keep=False)  # after describe() there is nothing left running; after an error, drop it

    def _new_profiler(self) -> torch.profiler.profile:
        kwargs = dict(self.profiler_kwargs)
        if "schedule" in kwargs and "on_trace_ready" not in kwargs and self.export_to_chrome:
            kwargs["on_trace_ready"] = self._export_window
        return torch.profiler.profile(**kwargs)

    def _export_window(self, profiler: torch.profiler.profile) -> None:
        """``on_trace_ready`` under a schedule: one trace per recorded window."""
        path = self._output_path(f".{profiler.step_num}.pt.trace.json", named=False)
        if path is not None:
            self._write_trace(profiler, path)

    def _finish(self, keep: bool) -> None:
        """End the recording; ``keep``: compute the averages and write the trace."""
        profiler, self.profiler = self.profiler, None
        for records in self._records.values():
            for record in reversed(records):
                record.__exit__(None, None, None)
        self._records.clear()
        if profiler is None:
            return
        profiler.stop()
        if not keep:
            return
        try:
            self.averages = profiler.key_averages(group_by_input_shape=self.group_by_input_shapes)
        except (AssertionError, RuntimeError):  # a schedule that recorded no window
            self.averages = None
        path = (
            None if "schedule" in self.profiler_kwargs else self._output_path(".pt.trace.json", named=False)
        )
        if path is not None and self.export_to_chrome and self.averages:
            self._write_trace(profiler, path)

    def _write_trace(self, profiler: torch.profiler.profile, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        self.trace_paths.append(str(path))
