"""Scaling: ember's overhead per step must not grow with the number of steps, of values logged per
step, or of callbacks. Each is measured at 1x, 10x and 100x.

    python benchmarks/scaling.py                  # updates benchmarks/RESULTS.md
    python benchmarks/scaling.py --quick --results /tmp/R.md --ratios /tmp/ratios

The ``tiny`` case of ``_contenders.py`` (an MLP 32-32-10, batch 16: a step of well under a
millisecond, so that what the framework adds is visible), timed as in ``step_overhead.py`` (CPU
time: one thread). Each dimension runs in one fresh process that trains every configuration of it
in turn, alternating over the repetitions, the hand-written loop among them as the baseline: the
configurations are compared inside one process, so that what differs between two processes of
the same program (where their memory lands, which core they share with what) does not enter the
differences, which are small (a few microseconds per logged value or callback).

- Steps: the hand-written loop, the ember Accelerator and the ember Trainer (defaults) train
  ``--steps`` x 1, 10, 100 steps. The overhead per step is a contender's time per step minus the
  hand loop's; the ratio recorded is the contender's time ratio to the hand loop at 10x and 100x
  over the same ratio at 1x (1: flat).
- Logged values: the Trainer calls ``self.log`` ``--metrics`` x 1, 10, 100 times per step. The
  cost per logged value (the overhead above that at 1x, divided by the extra values) must not grow:
  the ratio recorded is the cost per value from 10x to 100x over that from 1x to 10x (1: linear).
- Callbacks: the same with ``--callbacks`` x 1, 10, 100 callbacks that define every per-batch hook
  (each does nothing), so that the Trainer really calls them all.

1x is 10 values or callbacks: the cost from 1x to 10x is then 90 units of well under a
microsecond each, enough to stand out of the run-to-run noise of a ~0.5 ms step (with 5 units
at 1x, a repetition's 1x-to-10x cost was sometimes lost in it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, host, median_row, record_ratios, run_main
from _contenders import Run, measure, spawn, write_result

FACTORS = (1, 10, 100)
DIMENSIONS = ("steps", "metrics", "callbacks")
# ratio budgets: flat within the noise of a shared machine
STEPS_BUDGET = 1.1
PER_UNIT_BUDGET = 1.25


def worker(args: argparse.Namespace) -> None:
    """One dimension (``--worker steps|metrics|callbacks``): every job of it, alternating, in this process."""
    jobs = _jobs(args.worker, args)
    write_result(args.out, alternate(jobs, args.reps, lambda job: _us_per_step(job, args)))


def _us_per_step(job: str, args: argparse.Namespace) -> float:
    """One training run of ``job`` (see :func:`_job`) in this process: its CPU microseconds per step."""
    contender, steps, metrics, callbacks = job.split(":")
    root = tempfile.mkdtemp(prefix="run-", dir=args.root)  # each run its own logs and checkpoints
    run = Run(case="tiny", warmup=args.warmup, steps=int(steps), device=args.device, root=root,
              metrics=int(metrics), callbacks=int(callbacks))  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars and summaries
        return measure(contender, run)["cpu_s"] * 1e6


def _jobs(dimension: str, args: argparse.Namespace) -> list[str]:
    if dimension == "steps":
        return [_job(c, f * args.steps) for f in FACTORS for c in ("hand", "accelerator", "trainer")]
    base = args.metrics if dimension == "metrics" else args.callbacks
    return [_job("hand", args.unit_steps)] + [
        _job("trainer", args.unit_steps, **{dimension: f * base}) for f in FACTORS
    ]


def _measured(dimension: str, args: argparse.Namespace) -> dict[str, list[float]]:
    argv = ["--worker", dimension, "--steps", str(args.steps), "--unit-steps", str(args.unit_steps),
            "--metrics", str(args.metrics), "--callbacks", str(args.callbacks), "--warmup", str(args.warmup),
            "--reps", str(args.reps), "--device", args.device]  # fmt: skip
    return spawn(__file__, argv, 1, timeout=3600)[0]  # type: ignore[no-any-return]


def _job(contender: str, steps: int, metrics: int = 1, callbacks: int = 0) -> str:
    return f"{contender}:{steps}:{metrics}:{callbacks}"


def _steps(args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    us = _measured("steps", args)
    lines = ["| steps per run | hand loop us/step | Accelerator overhead us/step | Trainer overhead us/step |",
             "|---|---|---|---|"]  # fmt: skip
    for f in FACTORS:
        hand = us[_job("hand", f * args.steps)]
        over = {c: [a - h for a, h in zip(us[_job(c, f * args.steps)], hand, strict=True)]
                for c in ("accelerator", "trainer")}  # fmt: skip
        lines.append(f"| {f * args.steps} ({f}x) | {statistics.median(hand):.1f} | "
                     f"{statistics.median(over['accelerator']):.1f} | {statistics.median(over['trainer']):.1f} |")  # fmt: skip
    rows = []
    for contender in ("accelerator", "trainer"):
        relative = {f: [c / h for c, h in zip(us[_job(contender, f * args.steps)], us[_job("hand", f * args.steps)],
                                              strict=True)] for f in FACTORS}  # fmt: skip
        for f in FACTORS[1:]:
            growth = [r / base for r, base in zip(relative[f], relative[1], strict=True)]
            rows.append(median_row(f"{contender}: steps {f}x / 1x", growth, STEPS_BUDGET))
    return lines, rows


def _per_unit(kind: str, base: int, args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """The Trainer with ``base`` x 1, 10, 100 logged values (``kind="metrics"``) or callbacks."""
    counts = [f * base for f in FACTORS]
    jobs = _jobs(kind, args)
    us = _measured(kind, args)
    overhead = [[t - h for t, h in zip(us[job], us[jobs[0]], strict=True)] for job in jobs[1:]]
    # per repetition: the cost of each extra unit, from 1x to 10x and from 10x to 100x
    low = [(b - a) / (counts[1] - counts[0]) for a, b in zip(overhead[0], overhead[1], strict=True)]
    high = [(c - b) / (counts[2] - counts[1]) for b, c in zip(overhead[1], overhead[2], strict=True)]
    name = "values logged per step" if kind == "metrics" else "callbacks (every per-batch hook, empty)"
    lines = [
        f"| {name} | Trainer overhead us/step | us per extra {'value' if kind == 'metrics' else 'callback'} |",
        "|---|---|---|",
    ]
    for i, n in enumerate(counts):
        per = "" if i == 0 else f"{statistics.median(low if i == 1 else high):.2f}"
        lines.append(f"| {n} ({FACTORS[i]}x) | {statistics.median(overhead[i]):.1f} | {per} |")
    growth = [h / lo for lo, h in zip(low, high, strict=True)]
    return lines, [median_row(f"trainer: us per {kind[:-1]} 10x-100x / 1x-10x", growth, PER_UNIT_BUDGET)]


def report(args: argparse.Namespace) -> str:
    sections, rows = [], []
    measured = {
        "steps": ("Steps", lambda: _steps(args)),
        "metrics": ("Logged values", lambda: _per_unit("metrics", args.metrics, args)),
        "callbacks": ("Callbacks", lambda: _per_unit("callbacks", args.callbacks, args)),
    }
    for dimension in dict.fromkeys(args.dimensions):
        title, run = measured[dimension]
        lines, new_rows = run()
        sections += [f"### {title}", "", *lines, ""]
        rows += new_rows
    record_ratios(args.name, rows, args.ratios)
    ratio_lines = [f"| {r['case']} | {r['ratio']:.3f} | {r['low']:.3f}-{r['high']:.3f} | <= {r['budget']} | "
                   f"{'pass' if r['ratio'] <= r['budget'] else '**OVER**'} |" for r in rows]  # fmt: skip
    return "\n".join([
        "## Scaling of the overhead per step with steps, logged values and callbacks",
        "",
        f"The `tiny` case of `_contenders.py` (MLP 32-32-10, batch 16), {args.warmup} warm-up steps; each dimension in "
        f"one fresh process that runs its configurations in turn, {args.reps} alternating repetitions (after one "
        "unrecorded round). Overhead: CPU time per step "
        "minus the hand-written loop's in the same repetition (medians). Flat means: the time ratio to the hand "
        "loop does not grow with the steps, and each logged value or callback costs the same at 100x as at 10x.",
        host() + " 1 thread.",
        "",
        *sections,
        "| growth (1: flat) | median | spread (min-max) | budget | verdict |",
        "|---|---|---|---|---|",
        *ratio_lines,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dimensions", nargs="+", choices=DIMENSIONS, default=list(DIMENSIONS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps at 1x (steps dimension)")
    parser.add_argument(
        "--unit-steps", type=int, default=1000, help="timed steps per run for metrics/callbacks"
    )
    parser.add_argument("--metrics", type=int, default=10, help="values logged per step at 1x")
    parser.add_argument("--callbacks", type=int, default=10, help="callbacks at 1x")
    parser.add_argument("--warmup", type=int, default=30, help="steps before the timing starts")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)
    run_main(parser, "scaling", DIMENSIONS, worker, report, quick={"steps": 5, "unit_steps": 5, "metrics": 1, "callbacks": 1,
             "warmup": 3, "reps": 1})  # fmt: skip


if __name__ == "__main__":
    main()
