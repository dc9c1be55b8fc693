""":class:`AdvancedProfiler`: cProfile per action, reported with pstats (``profiler="advanced"``)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from typing_extensions import override

from ember._registry import Registry
from ember._validation import show
from ember.trainer.profilers.base import Profiler

if TYPE_CHECKING:
    import cProfile

__all__ = ["AdvancedProfiler"]


class AdvancedProfiler(Profiler):
    """Python's ``cProfile`` per action: every function called inside it, with its calls and times,
    sorted by cumulative time (``pstats``). Verbose, and it slows the run down several times: use it
    on a few batches (``limit_train_batches``).

    Example::

        trainer = Trainer(profiler=AdvancedProfiler(line_count_restriction=20), max_steps=10)

    Only one ``cProfile`` runs at a time, so a nested action pauses the one around it: each
    action's stats hold the calls made in it outside the actions nested in it (``training_step``
    holds the module's code, ``run_training_batch`` what surrounds it).

    Args:
        dirpath: the directory of the report file (see :class:`Profiler`).
        filename: with it, each process writes its report to a file instead of rank 0 printing it.
        line_count_restriction: functions listed per action: an int (a count) or a float in
            ``(0.0, 1.0]`` (a fraction of them), as ``pstats.Stats.print_stats`` takes.

    Raises:
        ValueError: ``stop`` of an action that is not running.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        line_count_restriction: float = 1.0,
    ) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        restriction = line_count_restriction
        if isinstance(restriction, bool) or not (
            (isinstance(restriction, int) and restriction >= 1)
            or (isinstance(restriction, float) and 0.0 < restriction <= 1.0)
        ):
            raise ValueError(
                f"AdvancedProfiler(line_count_restriction={show(restriction)}) must be an int >= 1 (a count "
                "of functions) or a float in (0.0, 1.0] (a fraction of them)"
            )
        self.line_count_restriction = line_count_restriction
        self.profiled_actions: dict[str, cProfile.Profile] = {}
        self._running: list[str] = []  # nested actions, innermost last: only that one's profile is on

    @classmethod
    @override
    def register_profilers(cls, registry: Registry[Profiler]) -> None:
        registry.register("advanced", cls, "cProfile of every action, reported with pstats")

    @override
    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        super().setup(stage, local_rank, log_dir)
        self.teardown(stage)
        self.profiled_actions.clear()

    @override
    def start(self, action_name: str) -> None:
        import cProfile  # (here: only this profiler needs it)

        if self._running:
            self.profiled_actions[self._running[-1]].disable()
        profile = self.profiled_actions.get(action_name)
        if profile is None:
            profile = self.profiled_actions[action_name] = cProfile.Profile()
        self._running.append(action_name)
        profile.enable()

    @override
    def stop(self, action_name: str) -> None:
        if action_name not in self._running:
            raise ValueError(f"AdvancedProfiler: {action_name!r} was stopped but it is not running")
        innermost = self._running[-1] == action_name
        if innermost:
            self.profiled_actions[action_name].disable()
        # Stopped out of order, it was paused already: it just leaves the stack.
        del self._running[len(self._running) - 1 - self._running[::-1].index(action_name)]
        if innermost and self._running:
            self.profiled_actions[self._running[-1]].enable()  # the action around it resumes

    @override
    def teardown(self, stage: str | None) -> None:
        if self._running:  # an exception went through running actions: leave no profile on
            self.profiled_actions[self._running[-1]].disable()
        self._running.clear()

    @override
    def summary(self) -> str:
        import pstats

        sections = {}
        for action, profile in self.profiled_actions.items():
            if action in self._running or not profile.getstats():
                continue  # (pstats would end a running profile, and refuses an empty one)
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text).strip_dirs().sort_stats("cumulative")
            stats.print_stats(self.line_count_restriction)
            sections[action] = text.getvalue()
        return self._sections(sections) if sections else ""
