""":class:`SimpleProfiler`: how often each action ran and how long it took (``profiler="simple"``)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_bool
from ember.trainer.profilers.base import Profiler

__all__ = ["SimpleProfiler"]


class SimpleProfiler(Profiler):
    """Wall-clock time of every action: its number of calls, mean and total duration, and its share
    of the stage's time, in a table sorted by that share.

    Example::

        trainer = Trainer(profiler=SimpleProfiler(filename="perf"))  # logs/.../fit-perf.txt
        trainer.fit(module)
        print(trainer.profiler.summary())

    Each action keeps a count and a sum, not every duration (Lightning keeps a list per action,
    which grows by one float per hook per batch). Nested actions are each timed whole, so the shares
    add up to more than 100%.

    Args:
        dirpath: the directory of the report file (see :class:`Profiler`).
        filename: with it, each process writes its report to a file instead of rank 0 printing it.
        extended: the call count and share columns too (else only the mean and total).

    Raises:
        ValueError: ``start`` of an action that is running, ``stop`` of one that is not.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        extended: bool = True,
    ) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        check_bool("extended", extended, owner="SimpleProfiler")
        self.extended = extended
        self.current_actions: dict[str, float] = {}  # running action -> its start (time.perf_counter)
        self.call_counts: dict[str, int] = {}
        self.total_seconds: dict[str, float] = {}
        self.start_time = time.perf_counter()

    @classmethod
    @override
    def register_profilers(cls, registry: Registry[Profiler]) -> None:
        registry.register("simple", cls, "wall-clock time and calls of every action")

    @override
    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        super().setup(stage, local_rank, log_dir)
        self.current_actions.clear()
        self.call_counts.clear()
        self.total_seconds.clear()
        self.start_time = time.perf_counter()

    @override
    def start(self, action_name: str) -> None:
        if action_name in self.current_actions:
            raise ValueError(f"SimpleProfiler: {action_name!r} was started while it runs")
        self.current_actions[action_name] = time.perf_counter()

    @override
    def stop(self, action_name: str) -> None:
        end = time.perf_counter()
        started = self.current_actions.pop(action_name, None)
        if started is None:
            raise ValueError(f"SimpleProfiler: {action_name!r} was stopped but it is not running")
        self.call_counts[action_name] = self.call_counts.get(action_name, 0) + 1
        self.total_seconds[action_name] = self.total_seconds.get(action_name, 0.0) + (end - started)

    @override
    def teardown(self, stage: str | None) -> None:
        self.current_actions.clear()  # an action an exception interrupted is not reported

    @override
    def summary(self) -> str:
        if not self.call_counts:
            return ""
        elapsed = time.perf_counter() - self.start_time
        rows = []
        for action, calls in self.call_counts.items():
            total = self.total_seconds[action]
            rows.append(
                (action, total / calls, calls, total, 100.0 * total / elapsed if elapsed > 0 else 0.0)
            )
        if self.extended:
            header = ("Action", "Mean duration (s)", "Num calls", "Total time (s)", "Percentage %")
            rows.sort(key=lambda row: row[4], reverse=True)
            first = ["Total", "-", str(sum(self.call_counts.values())), f"{elapsed:.5g}", "100 %"]
            body = [
                [a, f"{mean:.5g}", str(n), f"{total:.5g}", f"{share:.5g}"]
                for a, mean, n, total, share in rows
            ]
            return _table(self._title(), header, [first], body)
        rows.sort(key=lambda row: row[1], reverse=True)
        body = [[a, f"{mean:.5g}", f"{total:.5g}"] for a, mean, _, total, _ in rows]
        return _table(self._title(), ("Action", "Mean duration (s)", "Total time (s)"), [], body)


def _table(title: str, header: Sequence[str], first: list[list[str]], body: list[list[str]]) -> str:
    """A fixed-width text table: the header, an optional first group (the totals), the rows."""
    widths = [max(len(row[i]) for row in [header, *first, *body]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "|" + "|".join(f"  {cell:<{width}}  " for cell, width in zip(row, widths, strict=True)) + "|"

    rule = "-" * len(line(header))
    lines = [title, rule, line(header), rule]
    if first:
        lines += [*(line(row) for row in first), rule]
    lines += [*(line(row) for row in body), rule]
    return os.linesep.join(lines)
