"""Scaling: ember's overhead per step must not grow with the number of steps, of values logged per
step, or of callbacks. Each is measured at 1x, 10x and 100x.

    python benchmarks/scaling.py                  # updates benchmarks/RESULTS.md
    python benchmarks/scaling.py --quick --results /tmp/R.md --ratios /tmp/ratios

The ``tiny`` case of ``_contenders.py`` (an MLP 32-32-10, batch 16: a step of well under a
millisecond, so that what the framework adds is visible), timed by CPU time (one thread). Each
dimension runs in one fresh process that trains every configuration of it in turn, in alternating
rounds (``--reps`` for the steps, ``--unit-reps`` for the others), after one short unrecorded run
of each contender (imports, first calls).

Every run is paced, as in ``step_overhead.py`` (``measure(..., paced=True)``): before each of its
steps the hand-written loop takes a step on its own copy of the model and data, timed apart. A
run's *speed* is its CPU time per step over its pacer's, so a change of the machine's speed (the
other core's load, the clock) hits both alike and cancels. Unpaced, the CPU time per step of one
configuration moved by up to 2x between the runs of a busy 2-core machine, and the growth ratios
spread over 0.5-2 (and below 0 for callbacks): undecidable. Every growth is paired: it compares
runs of the same round, and the table gives its median, spread and the median's 90% interval.

- Steps: the ember Accelerator and the ember Trainer (defaults) train ``--steps`` x 1, 10, 100
  steps. The growth recorded is a contender's speed at 10x and at 100x over its speed at 1x in the
  same round (1: flat), the round's 1x speed being the median of ``ONE_X_RUNS`` (3) runs. Paced,
  even a 1x run (50 steps, ~35 ms) gives the speed within about 5%, and the median of three keeps
  one odd short run from deciding a round (a 1x run is mostly set-up: two more cost little). The
  hand-written loop needs no runs of its own: what pacing costs the paced side (it runs after the
  pacer's step, in the caches that step left) is the same at every length and cancels in the growth.
- Logged values: the Trainer calls ``self.log`` ``--metrics`` x 1, 10, 100 times per step. The
  cost per extra value is the difference of two runs' speeds times the round's pacer time (us),
  divided by the extra values; the growth recorded is that cost from 10x to 100x over that from 1x
  to 10x, in the same round (1: linear).
- Callbacks: the same with ``--callbacks`` x 1, 10, 100 callbacks that define every per-batch hook
  (each does nothing), so that the Trainer really calls them all.

Pacing cancels a slower machine best for work like the pacer's (a model step). The Python of a
thousand ``self.log`` calls slows less than the pacer under load, so a run's speed there still
depends somewhat on the load of its moment; the per-unit dimensions therefore run more, shorter
rounds (8 of 350 steps): the three runs of a round are close in time, and the median of 8 has a
narrower interval than that of 5 longer ones, for about the same time. 1x is 10 values or callbacks: the
cost from 1x to 10x is 90 units of ~1-2 us each, well above the few microseconds by which a paced
run's step moves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, host, interval_text, median_row, record_ratios, run_main
from _contenders import Run, measure, spawn, write_result

FACTORS = (1, 10, 100)
DIMENSIONS = ("steps", "metrics", "callbacks")
CONTENDERS = ("accelerator", "trainer")  # the steps dimension's
# Runs of each contender at 1x steps per round (their median is the round's 1x speed): a 50-step run
# is mostly set-up, so two more cost little, and the median keeps one odd short run from deciding.
ONE_X_RUNS = 3
# ratio budgets: flat within the noise of a shared machine
STEPS_BUDGET = 1.1
PER_UNIT_BUDGET = 1.25


def worker(args: argparse.Namespace) -> None:
    """One dimension (``--worker steps|metrics|callbacks``): every job of it, alternating, in this process."""
    jobs = _jobs(args.worker, args)
    # One short run of each contender first, unrecorded: imports and first calls. The windows
    # start after ``--warmup`` steps of each run; this is for what only the first run would pay.
    for contender in dict.fromkeys(job.split(":")[0] for job in jobs):
        _paced(_job(contender, args.warmup), args)
    rounds = args.reps if args.worker == "steps" else args.unit_reps
    write_result(args.out, alternate(jobs, rounds, lambda job: _paced(job, args), warm=False))


def _paced(job: str, args: argparse.Namespace) -> tuple[float, float]:
    """One paced training run of ``job`` (see :func:`_job`) in this process: its CPU microseconds per
    step and its pacer's (the hand-written loop's steps between its own)."""
    contender, steps, metrics, callbacks = job.split("#")[0].split(":")
    root = tempfile.mkdtemp(prefix="run-", dir=args.root)  # each run its own logs and checkpoints
    run = Run(case="tiny", warmup=args.warmup, steps=int(steps), device=args.device, root=root,
              metrics=int(metrics), callbacks=int(callbacks))  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars and summaries
        measured = measure(contender, run, paced=True)
    return measured["cpu_s"] * 1e6, measured["pace_cpu_s"] * 1e6


def _jobs(dimension: str, args: argparse.Namespace) -> list[str]:
    if dimension == "steps":
        copies = [f"{_job(c, args.steps)}#{i}" for c in CONTENDERS for i in range(1, ONE_X_RUNS)]
        return [_job(c, f * args.steps) for f in FACTORS for c in CONTENDERS] + copies
    base = args.metrics if dimension == "metrics" else args.callbacks
    return [_job("trainer", args.unit_steps, **{dimension: f * base}) for f in FACTORS]


def _measured(dimension: str, args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """Job -> per round, [the run's us per step, its pacer's]."""
    argv = ["--worker", dimension, "--steps", str(args.steps), "--unit-steps", str(args.unit_steps),
            "--metrics", str(args.metrics), "--callbacks", str(args.callbacks), "--warmup", str(args.warmup),
            "--reps", str(args.reps), "--unit-reps", str(args.unit_reps), "--device", args.device]  # fmt: skip
    return spawn(__file__, argv, 1, timeout=3600)[0]  # type: ignore[no-any-return]


def _job(contender: str, steps: int, metrics: int = 1, callbacks: int = 0) -> str:
    return f"{contender}:{steps}:{metrics}:{callbacks}"


def _speeds(runs: Sequence[Sequence[float]]) -> list[float]:
    """Each round's run time per step over its pacer's."""
    return [own / pace for own, pace in runs]


def _runs(us: dict[str, list[list[float]]], contender: str, steps: int) -> list[list[float]]:
    """Every run of ``contender`` with ``steps`` steps (at 1x: each round's :data:`ONE_X_RUNS`)."""
    return [run for job, runs in us.items() if job.split("#")[0] == _job(contender, steps) for run in runs]


def _steps(args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    us = _measured("steps", args)
    lines = ["| steps per run | pacer (hand loop) us/step | Accelerator us/step | Accelerator speed | "
             "Trainer us/step | Trainer speed |", "|---|---|---|---|---|---|"]  # fmt: skip
    for f in FACTORS:
        runs = {c: _runs(us, c, f * args.steps) for c in CONTENDERS}
        pacer = statistics.median(pace for c in CONTENDERS for _, pace in runs[c])
        cells = [f"{statistics.median(own for own, _ in runs[c]):.1f} | {statistics.median(_speeds(runs[c])):.3f}"
                 for c in CONTENDERS]  # fmt: skip
        lines.append(f"| {f * args.steps} ({f}x) | {pacer:.1f} | {' | '.join(cells)} |")
    rows = []
    for contender in CONTENDERS:
        speed = {f: _speeds(us[_job(contender, f * args.steps)]) for f in FACTORS[1:]}
        copies = [_speeds(us[job]) for job in us if job.split("#")[0] == _job(contender, args.steps)]
        one_x = [statistics.median(round_) for round_ in zip(*copies, strict=True)]
        for f in FACTORS[1:]:
            growth = [s / base for s, base in zip(speed[f], one_x, strict=True)]
            rows.append(median_row(f"{contender}: steps {f}x / 1x", growth, STEPS_BUDGET))
    return lines, rows


def _per_unit(kind: str, base: int, args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """The Trainer with ``base`` x 1, 10, 100 logged values (``kind="metrics"``) or callbacks."""
    counts = [f * base for f in FACTORS]
    us = _measured(kind, args)
    runs = [us[job] for job in _jobs(kind, args)]
    speeds = [_speeds(r) for r in runs]
    # per round: the pacer's us per step (the three runs' mean) turns speeds into microseconds
    pacer = [statistics.fmean(r[i][1] for r in runs) for i in range(len(runs[0]))]
    low, high = (_unit_us(speeds[i], speeds[i + 1], pacer, counts[i + 1] - counts[i]) for i in (0, 1))
    unit = "value" if kind == "metrics" else "callback"
    name = "values logged per step" if kind == "metrics" else "callbacks (every per-batch hook, empty)"
    lines = [f"| {name} | Trainer us/step | pacer (hand loop) us/step | Trainer speed | us per extra {unit} |",
             "|---|---|---|---|---|"]  # fmt: skip
    for i, n in enumerate(counts):
        per = "" if i == 0 else f"{statistics.median(low if i == 1 else high):.2f}"
        own, pace = (statistics.median(r[k] for r in runs[i]) for k in (0, 1))
        speed = statistics.median(speeds[i])
        lines.append(f"| {n} ({FACTORS[i]}x) | {own:.1f} | {pace:.1f} | {speed:.3f} | {per} |")
    growth = [h / lo for lo, h in zip(low, high, strict=True)]
    return lines, [median_row(f"trainer: us per {kind[:-1]} 10x-100x / 1x-10x", growth, PER_UNIT_BUDGET)]


def _unit_us(fewer: list[float], more: list[float], pacer: list[float], units: int) -> list[float]:
    """Per round: the microseconds of each of ``units`` extra units, from the speeds of the runs with
    fewer and with more of them and the round's pacer time."""
    return [(b - a) * p / units for a, b, p in zip(fewer, more, pacer, strict=True)]


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
    ratio_lines = [f"| {r['case']} | {r['ratio']:.3f} | {r['low']:.3f}-{r['high']:.3f} | {interval_text(r)} | "
                   f"<= {r['budget']} | {'pass' if r['ratio'] <= r['budget'] else '**OVER**'} |" for r in rows]  # fmt: skip
    return "\n".join([
        "## Scaling of the overhead per step with steps, logged values and callbacks",
        "",
        f"The `tiny` case of `_contenders.py` (MLP 32-32-10, batch 16), {args.warmup} warm-up steps per run; "
        "each dimension in one fresh process that runs its configurations in turn, in alternating rounds "
        f"({args.reps} of {args.steps} x 1, 10, 100 steps for the steps, {ONE_X_RUNS} runs at 1x; {args.unit_reps} "
        f"of {args.unit_steps} steps for values and callbacks), after one short unrecorded run of each contender. Every run is paced: "
        "before each of its steps the hand-written loop takes a step on its own copy of the model and data, "
        "timed apart (CPU time), and the run's speed is its time per step over its pacer's, so a change of the "
        "machine's speed during the run hits both alike (unpaced, the same configuration's time per step moved "
        "by up to 2x between runs on a busy machine, and these growths were undecidable). Steps: a contender's "
        "speed at 10x and 100x the steps over its speed at 1x (the median of the round's 1x runs) in the same round (1: flat; what pacing costs the "
        "paced side is the same at every length and cancels). Logged values and callbacks: the cost of each "
        "extra unit (the difference of two runs' speeds times the round's pacer time, per unit), from 10x to "
        "100x over that from 1x to 10x in the same round (1: linear). Tables: medians over the rounds; "
        "growth: median, spread and the median's 90% interval (undecided when the budget lies inside it).",
        host() + " 1 thread.",
        "",
        *sections,
        "| growth (1: flat) | median | spread (min-max) | 90% interval of the median | budget | verdict |",
        "|---|---|---|---|---|---|",
        *ratio_lines,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dimensions", nargs="+", choices=DIMENSIONS, default=list(DIMENSIONS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps at 1x (steps dimension)")
    parser.add_argument(
        "--unit-steps", type=int, default=350, help="timed steps per run for metrics/callbacks"
    )
    parser.add_argument("--metrics", type=int, default=10, help="values logged per step at 1x")
    parser.add_argument("--callbacks", type=int, default=10, help="callbacks at 1x")
    parser.add_argument("--warmup", type=int, default=30, help="steps before the timing starts")
    parser.add_argument("--reps", type=int, default=5, help="alternating rounds (steps)")
    parser.add_argument("--unit-reps", type=int, default=8, help="alternating rounds (metrics/callbacks)")
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)
    run_main(parser, "scaling", DIMENSIONS, worker, report, quick={"steps": 5, "unit_steps": 5, "metrics": 1, "callbacks": 1,
             "warmup": 3, "reps": 1, "unit_reps": 1})  # fmt: skip


if __name__ == "__main__":
    main()
