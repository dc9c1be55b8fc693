"""The :class:`Profiler` interface of ``Trainer(profiler=...)``, and how the argument is resolved.

A profiler is told when each *action* starts and stops (``start(name)`` / ``stop(name)``); the
Trainer names its actions as Lightning does (the list is in docs/reference/trainer.md, "Profiling").
At the end of each stage the Trainer calls :meth:`Profiler.describe`, which prints the
:meth:`~Profiler.summary` on global rank 0, or writes each process's own file when a ``filename``
is given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ember._registry import Registry
from ember._validation import check_path, check_str, show

__all__ = ["PROFILER_REGISTRY", "PassThroughProfiler", "Profiler", "resolve_profiler"]


class Profiler:
    """Records the actions the Trainer runs; this base records nothing (subclass it).

    Override :meth:`start`, :meth:`stop` and :meth:`summary`; :meth:`setup` and :meth:`teardown`
    when the profiler holds something per stage. The Trainer calls ``setup`` when a stage starts
    (before the ``setup`` hooks, which are timed too) and ``describe`` when it ends.

    Example::

        class CountingProfiler(Profiler):
            def __init__(self):
                super().__init__()
                self.counts = collections.Counter()

            def start(self, action_name):
                self.counts[action_name] += 1

            def summary(self):
                return "\\n".join(f"{name}: {n}" for name, n in self.counts.items())

        Trainer(profiler=CountingProfiler())

    Args:
        dirpath: the directory of the report file; ``None``: the Trainer's ``log_dir``.
        filename: with it, each process appends its report to
            ``{dirpath}/{stage}-{filename}[-{rank}].txt`` (the rank only with several processes)
            instead of global rank 0 printing it.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, filename: str | None = None) -> None:
        owner = type(self).__name__
        check_path("dirpath", dirpath, owner=owner, optional=True)
        check_str("filename", filename, owner=owner, optional=True)
        if filename == "" or (filename and os.sep in filename):
            raise ValueError(
                f"{owner}(filename={show(filename)}) must be a file name (not empty, no {os.sep!r})"
            )
        self.dirpath = dirpath
        self.filename = filename
        self._stage: str | None = None
        self._local_rank: int | None = None

    @classmethod
    def register_profilers(cls, registry: Registry[Profiler]) -> None:
        """Add the names ``Trainer(profiler=...)`` takes for this class (the base adds none)."""

    def start(self, action_name: str) -> None:
        """``action_name`` starts (the base records nothing)."""

    def stop(self, action_name: str) -> None:
        """``action_name`` ends (the base records nothing)."""

    def summary(self) -> str:
        """The report of what was recorded since :meth:`setup`; empty when there is nothing to say."""
        return ""

    @contextmanager
    def profile(self, action_name: str) -> Iterator[str]:
        """Time the code of a ``with`` block as ``action_name``::

        with trainer.profiler.profile("load the vocabulary"):
            vocabulary = load(path)
        """
        self.start(action_name)
        try:
            yield action_name
        finally:
            self.stop(action_name)

    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        """A stage starts: what is recorded from here on is this stage's report.

        ``local_rank``: this process's rank (None with one process); the Trainer passes the global
        rank, which is the local one on one node and keeps the files of several nodes apart.
        ``log_dir``: where the report file goes when no ``dirpath`` was given.
        """
        self._stage = stage
        self._local_rank = local_rank
        self.dirpath = self.dirpath or log_dir

    def teardown(self, stage: str | None) -> None:
        """The stage ended (also after an exception): release what :meth:`setup` or :meth:`start`
        acquired. The report stays readable with :meth:`summary`. The base holds nothing."""

    def describe(self) -> None:
        """Print the :meth:`summary` on rank 0, or append each process's own to its file, then
        :meth:`teardown`."""
        report = self.summary()
        path = self.report_path()
        if report and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as file:
                file.write(report + "\n")
        elif report and self._local_rank in (None, 0):
            print(report, flush=True)
        self.teardown(self._stage)

    def report_path(self) -> Path | None:
        """Where this process's report goes (``{dirpath}/{stage}-{filename}[-{rank}].txt``), or None:
        without a ``filename`` the report is printed."""
        return self._output_path(".txt", named=True)

    def _output_path(self, extension: str, named: bool) -> Path | None:
        """``{dirpath}/{stage}[-{filename}][-{rank}]{extension}``; None without a directory, or
        without a ``filename`` when ``named``."""
        if not self.dirpath or (named and not self.filename):
            return None
        parts = [p for p in (self._stage, self.filename) if p] or ["profile"]
        if self._local_rank is not None:
            parts.append(str(self._local_rank))
        return Path(self.dirpath) / ("-".join(parts) + extension)

    @property
    def local_rank(self) -> int:
        """The rank given to :meth:`setup` (0 with one process)."""
        return self._local_rank or 0

    def _title(self) -> str:
        return f"{self._stage.upper()} Profiler Report" if self._stage else "Profiler Report"

    def _sections(self, sections: dict[str, str]) -> str:
        """A report of one titled section per action (the advanced and PyTorch profilers')."""
        rank = f" rank: {self._local_rank}" if self._local_rank is not None else ""
        lines = [self._title()]
        for action, text in sections.items():
            lines += [f"Profile stats for: {action}{rank}", text]
        return os.linesep.join(lines)


class PassThroughProfiler(Profiler):
    """Lightning's name for the profiler that records nothing: what ``trainer.profiler`` is without a
    ``profiler=`` argument, so that ``with trainer.profiler.profile(name):`` works either way."""


PROFILER_REGISTRY: Registry[Profiler] = Registry("profiler", "profiler")  # filled in __init__.py


def resolve_profiler(value: Any) -> Profiler | None:
    """``Trainer(profiler=...)``: None, a registered name (``"simple"``, ``"advanced"``,
    ``"pytorch"``) or a :class:`Profiler`; anything else is a ValueError naming the choices.
    A :class:`PassThroughProfiler` is None: it records nothing, so nothing is wrapped."""
    if value is None or isinstance(value, PassThroughProfiler):
        return None
    if isinstance(value, Profiler):
        return value
    if isinstance(value, str) and value in PROFILER_REGISTRY:
        return PROFILER_REGISTRY.create(value)
    choices = ", ".join(repr(name) for name in PROFILER_REGISTRY.names())
    raise ValueError(
        f"profiler={show(value)} is not a profiler. Valid choices: None, {choices}, or an instance of "
        "ember.trainer.profilers.Profiler (SimpleProfiler(filename=...), ...)"
    )
