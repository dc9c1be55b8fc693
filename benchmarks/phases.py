"""Where a step's time goes: the hand-written loop, ember's Accelerator and Trainer (and Fabric and
🤗 Accelerate, when installed) with each step split into phases, in microseconds.

    python benchmarks/phases.py                          # updates benchmarks/RESULTS.md
    python benchmarks/phases.py --quick --results /tmp/R.md --ratios /tmp/ratios

``step_overhead.py`` says how much a framework adds to a step; this says where. Every contender
trains the MLP of ``step_overhead.py`` (``_contenders.py``: same model, data, AdamW, one thread)
with the same instrumentation, which takes a timestamp (``time.perf_counter_ns``) at events every
one of them goes through:

- the model's forward starting and ending (the :class:`~_contenders.Clock` around the model),
- ``torch.Tensor.backward`` starting and ending (each contender's ``loss.backward()``),
- the optimizer's step starting and ending (torch's global optimizer step hooks),
- torch's DataLoader iterator producing the next batch (its ``__next__``).

The gaps between those events are the phases: framework code can only run in the gaps that hold no
kernel (``loss and hooks``, ``before the step``, ``after the step``, ``to the forward``). A phase's
time is the mean over the fastest 90% of a run's steps; the table gives its median over the rounds
(contenders alternating within one process, as in ``step_overhead.py``), and each contender's
difference from the hand-written loop of its own process. The events cost the same in every
contender (about 0.2 us each), so the differences are the frameworks'. Lightning's Trainer runs
the forward and backward inside the optimizer's step (a closure), so its events come in another
order: it is not split here. On the CPU only: on a GPU the kernels run asynchronously, and the
events would time their launches.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, host, record_ratios, run_main
from _contenders import LABELS, NEEDS, Clock, Run, measure, missing_package, spawn, write_result

CONTENDERS = ("hand", "accelerator", "trainer", "fabric", "accelerate")
# ember's contenders share a process; each rival has its own. Each process also runs the hand loop.
GROUPS = {"ember": ("accelerator", "trainer"), "fabric": ("fabric",), "accelerate": ("accelerate",)}
# The events of one step, in the order every contender here goes through them, and the phases
# between them (the last one ends at the next step's forward).
EVENTS = ("forward", "forward_end", "backward", "backward_end", "step", "step_end", "batch", "batch_end")
PHASES = {
    "forward": "forward (the model)",
    "forward_end": "loss and hooks (loss, `self.log`, hooks before backward)",
    "backward": "backward",
    "backward_end": "before the step (hooks, clipping, unscaling)",
    "step": "optimizer step",
    "step_end": "after the step (zero_grad, batch-end hooks, progress bar, logger)",
    "batch": "next batch (DataLoader)",
    "batch_end": "to the forward (moving the batch, batch-start hooks, calling training_step)",
}
FRAMEWORK_PHASES = ("forward_end", "backward_end", "step_end", "batch_end")  # no kernel of the step in them
KEEP = 0.9  # the fastest 90% of a run's steps: a few steps meet a page fault or another process


class Recorder:
    """The events of the steps inside the Clock's window, as ``(event, ns)``; one list per step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, int]]] = []
        self.current: list[tuple[str, int]] | None = None  # None: outside the window

    def mark(self, event: str) -> None:
        if self.current is not None:
            self.current.append((event, time.perf_counter_ns()))

    def forward(self, clock: Clock) -> None:
        """At each forward's start: close the previous step, open the next inside the window."""
        now = time.perf_counter_ns()
        if self.current is not None:
            self.current.append(("next", now))
            self.steps.append(self.current)
        inside = clock.start <= clock.calls < clock.stop
        self.current = [("forward", now)] if inside else None

    def phases(self) -> dict[str, float]:
        """Microseconds per phase: the mean over the fastest :data:`KEEP` of the steps."""
        order = [*EVENTS, "next"]
        for step in self.steps:
            if [event for event, _ in step] != order:
                raise RuntimeError(
                    f"a step's events came as {[e for e, _ in step]}, expected {order}: this contender "
                    "does not run forward, backward, optimizer step and the next batch in that order"
                )
        result = {}
        for i, phase in enumerate(EVENTS):
            gaps = sorted(step[i + 1][1] - step[i][1] for step in self.steps)
            kept = gaps[: max(1, int(len(gaps) * KEEP))]
            result[phase] = statistics.fmean(kept) / 1e3
        return result


def instrument(recorder: Recorder) -> None:
    """Put the recorder's marks on every contender's path (this process only: a worker's)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils.data import dataloader

    clock_forward = Clock.forward

    def forward(self: Clock, x: torch.Tensor) -> torch.Tensor:
        recorder.forward(self)
        y = clock_forward(self, x)
        recorder.mark("forward_end")
        return y

    Clock.forward = forward  # type: ignore[method-assign]
    torch.Tensor.backward = _bracket(torch.Tensor.backward, recorder, "backward")  # type: ignore[method-assign]
    iterator = dataloader._BaseDataLoaderIter
    iterator.__next__ = _bracket(iterator.__next__, recorder, "batch")  # type: ignore[method-assign]
    register_optimizer_step_pre_hook(lambda *_: recorder.mark("step"))
    register_optimizer_step_post_hook(lambda *_: recorder.mark("step_end"))


def _bracket(function: Callable[..., Any], recorder: Recorder, event: str) -> Callable[..., Any]:
    def bracketed(*args: Any, **kwargs: Any) -> Any:
        recorder.mark(event)
        try:  # the end even of a StopIteration (Accelerate reads one batch ahead: the last finds none)
            return function(*args, **kwargs)
        finally:
            recorder.mark(f"{event}_end")

    return bracketed


def worker(args: argparse.Namespace) -> None:
    """One group's process: the hand loop and the group's contenders, alternating, instrumented."""
    recorder = Recorder()
    instrument(recorder)
    run = Run(case="mlp", warmup=args.warmup, steps=args.steps, root=args.root)

    def phases(contender: str) -> dict[str, float]:
        recorder.steps.clear()
        measure(contender, run)
        return recorder.phases()

    write_result(args.out, alternate(["hand", *args.contenders], args.rounds, phases, warm=False))


def report(args: argparse.Namespace) -> str:
    contenders = [c for c in dict.fromkeys(args.contenders) if c != "hand"]
    skipped = {c: p for c in contenders if (p := missing_package(c)) is not None}
    running = [c for c in contenders if c not in skipped]
    columns: dict[str, dict[str, float]] = {}  # contender -> phase -> median us
    hands: dict[str, dict[str, float]] = {}  # contender -> the hand loop of its own process
    for group, members in GROUPS.items():
        mine = [c for c in members if c in running]
        if not mine:
            continue
        argv = ["--worker", group, "--contenders", *mine, "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--rounds", str(args.rounds)]  # fmt: skip
        (measured,) = spawn(__file__, argv, 1)
        medians = {
            c: {p: statistics.median(r[p] for r in runs) for p in EVENTS} for c, runs in measured.items()
        }
        columns.setdefault("hand", medians["hand"])  # the first group's (ember's) hand loop is shown
        for c in mine:
            columns[c], hands[c] = medians[c], medians["hand"]
    record_ratios(args.name, [], args.ratios)  # time per step is step_overhead.py's: no ratio here
    lines = _table(columns, hands)
    notes = [
        f"- {LABELS[c]}: skipped, `{p}` is not installed (`pip install -e '.[bench]'`)."
        for c, p in skipped.items()
    ]
    packages = sorted({NEEDS[c] for c in running if c in NEEDS})
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages) or "none installed"
    return "\n".join([
        "## Where a step's time goes: phases of a step, in microseconds",
        "",
        f"MLP 128-256-256-10, batch 64, AdamW, 1 process, 1 thread: {args.steps} steps after {args.warmup} warm-up "
        f"steps per run, {args.rounds} alternating rounds (ember's contenders in one process, each rival in its own, "
        "each with the hand-written loop). A phase is the time between two events every contender goes through "
        "(the forward's start and end, `loss.backward()`'s, the optimizer step's, the DataLoader's next batch): "
        f"mean over the fastest {KEEP:.0%} of a run's steps, median over the rounds; in brackets the difference "
        "from the hand-written loop of the same process. Framework code runs in the phases marked *; the others "
        "hold the same kernels for everyone (their differences are noise, or caches the framework's code evicted).",
        host() + " Wall-clock time (`time.perf_counter_ns`).",
        f"Other frameworks: {versions}.",
        "",
        *lines,
        *notes,
    ])  # fmt: skip


def _table(columns: dict[str, dict[str, float]], hands: dict[str, dict[str, float]]) -> list[str]:
    names = list(columns)
    lines = ["| phase | " + " | ".join(LABELS[c] for c in names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(contender: str, phases: tuple[str, ...]) -> str:
        value = sum(columns[contender][p] for p in phases)
        if contender == "hand":
            return f"{value:.1f}"
        return f"{value:.1f} ({value - sum(hands[contender][p] for p in phases):+.1f})"

    for phase in EVENTS:
        star = "*" if phase in FRAMEWORK_PHASES else ""
        lines.append(f"| {PHASES[phase]}{star} | " + " | ".join(cell(c, (phase,)) for c in names) + " |")
    lines.append("| **framework phases*** | " + " | ".join(cell(c, FRAMEWORK_PHASES) for c in names) + " |")
    lines.append("| **whole step** | " + " | ".join(cell(c, EVENTS) for c in names) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--steps", type=int, default=400, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timing starts")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds in each process")
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)  # a worker's log directory
    run_main(parser, "phases", list(GROUPS), worker, report,
             quick={"steps": 20, "warmup": 5, "rounds": 1})  # fmt: skip


if __name__ == "__main__":
    main()
