"""Step overhead: ember's Accelerator and Trainer against a hand-written PyTorch loop (and against
Lightning's Trainer and Fabric and 🤗 Accelerate, when installed: ``pip install -e '.[bench]'``).

    python benchmarks/step_overhead.py                  # MLP and GPT, 1 process and DDP on 2; updates RESULTS.md
    python benchmarks/step_overhead.py --quick --cases mlp --modes single --results /tmp/R.md --ratios /tmp/ratios
    python benchmarks/step_overhead.py --device cuda    # the same on a GPU (bf16-mixed, NCCL): section step_overhead_cuda

Every contender trains the same model on the same data with the same optimizer (AdamW): the MLP
128-256-256-10 (batch 64) and the example GPT (``examples/gpt_fsdp.py``, 2 layers of width 64,
batch 16 x 32 tokens), one thread per process. Each process (``ember launch`` starts the 2 DDP
ranks) trains the hand-written loop and its contenders -- ember's Accelerator and Trainer in one
process, each rival in its own -- in alternating rounds (A B C, B C A, ...): ember's ``--rounds``
spread over ``--processes`` fresh processes run one after the other, a rival's ``--rival-rounds`` in
one; every run a fresh model and trainer. A run times ``--steps`` steps
after ``--warmup`` steps, paced (see ``_contenders.py``): before each of its steps, the hand-written
loop takes a step on its own copy of the model and data, timed apart, so both see the machine at the
same speed. A run's speed is its time per step over its pacer's; a contender's ratio is its speed
over the hand-written loop's paced run in the same round of the same process, reported as the
median and the spread over the rounds.

Budgets: ember Accelerator <= 1.01x and ember Trainer (defaults: checkpointing, CSV logger,
progress bar, model summary, non-finite guard) <= 1.02x the hand-written loop, and below
Lightning's Trainer (defaults) and Fabric respectively.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import host, ratio_row, ratio_table, record_ratios, run_main
from _contenders import (
    BUDGETS,
    CONTENDERS,
    DESCRIPTIONS,
    LABELS,
    NEEDS,
    RIVALS,
    Run,
    measure_rounds,
    missing_package,
    spawn,
    write_result,
)

CASES = ("mlp", "gpt")
MODES = {"single": 1, "ddp": 2}
# Timed steps per run (``--steps`` overrides): a window of ~0.4-0.8 s of each contender's own steps
# (the MLP's ~1.5 ms, the GPT's ~8 ms); paced, a run's ratio no longer needs a long window to settle.
STEPS = {"mlp": 250, "gpt": 100}
# The processes of a case: ember's two contenders share one; each rival has its own. Every process
# also runs the hand-written loop, alternating with its contenders round by round.
GROUPS = {"ember": ("accelerator", "trainer"), **{c: (c,) for c in CONTENDERS if c in NEEDS}}


def worker(args: argparse.Namespace) -> None:
    """One rank of one group's process (started by :func:`spawn`): the hand-written loop and the
    group's contenders, alternating for ``--rounds`` rounds."""
    case = args.cases[0]
    run = Run(case=case, warmup=args.warmup, steps=_steps(case, args), device=args.device, root=args.root)
    write_result(args.out, measure_rounds(["hand", *args.contenders], run, args.rounds, paced=True))


def _steps(case: str, args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else STEPS[case]


def _clock(mode: str, device: str) -> str:
    """What is timed: the CPU time of a single process on the CPU (one thread, so it is the step's
    cost, and other load on a shared machine does not count), else the wall-clock time."""
    return "cpu_s" if mode == "single" and device == "cpu" else "step_s"


def group_times(
    group: str, members: list[str], case: str, mode: str, args: argparse.Namespace
) -> dict[str, list[tuple[float, float]]]:
    """One process (one per rank) of ``group``: for its contenders and the hand-written loop, round
    by round, (seconds per step, the pacer's seconds per step in the same run); on several ranks
    each the slowest rank's."""
    clock = _clock(mode, args.device)
    pace = "pace_cpu_s" if clock == "cpu_s" else "pace_s"
    times: dict[str, list[tuple[float, float]]] = {c: [] for c in ["hand", *members]}
    for rounds in _shares(group, args):  # one process (one per rank) after the other
        argv = ["--worker", group, "--contenders", *members, "--cases", case, "--steps", str(_steps(case, args)),
                "--warmup", str(args.warmup), "--rounds", str(rounds), "--device", args.device]  # fmt: skip
        ranks = spawn(__file__, argv, MODES[mode])
        for c, runs in times.items():
            runs += [(max(rank[c][i][clock] for rank in ranks), max(rank[c][i][pace] for rank in ranks))
                     for i in range(rounds)]  # fmt: skip
    return times


def _shares(group: str, args: argparse.Namespace) -> list[int]:
    """The rounds of each of the group's processes: ember's ``--rounds`` spread over ``--processes``
    fresh processes, since two processes running the same code can differ by a few percent for the
    whole of their life (where the allocator put the model, the interpreter's objects; a median of
    one process's rounds, however steady, carries its process's offset); a rival's in one."""
    rounds = _rounds(group, args)
    processes = max(1, min(args.processes if group == "ember" else 1, rounds))
    return [rounds // processes + (i < rounds % processes) for i in range(processes)]


def _rounds(group: str, args: argparse.Namespace) -> int:
    """ember's contenders are held to budgets of 1-2%: ``--rounds``. The rivals' ratios only need to be
    told apart from ember's (Fabric's, the closest, is several percent higher): ``--rival-rounds``."""
    return args.rounds if group == "ember" else min(args.rounds, args.rival_rounds)


def _case(
    case: str, mode: str, contenders: list[str], args: argparse.Namespace
) -> tuple[list[str], list[dict[str, Any]]]:
    """One case: its title, ratio table and comparisons, and its ratio rows."""
    groups = {g: [c for c in members if c in contenders] for g, members in GROUPS.items()}
    groups = {g: members for g, members in groups.items() if members}
    # One process on the CPU is timed by its CPU time: two such processes can share the 2 cores.
    jobs = args.jobs if _clock(mode, args.device) == "cpu_s" else 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        measured = dict(zip(groups, pool.map(lambda g: group_times(g, groups[g], case, mode, args), groups),
                            strict=True))  # fmt: skip
    by_contender = {}
    for group, times in measured.items():
        # A run's speed against its pacer, over the hand-written loop's against its own pacer in the
        # same round and process: the hand-written loop's own run cancels what the pacing itself adds.
        hand = [own / pace for own, pace in times["hand"]]
        for c in groups[group]:
            row = ratio_row(f"{case} {mode}: {LABELS[c]}", [own / pace for own, pace in times[c]], hand,
                            BUDGETS.get(c))  # fmt: skip
            by_contender[c] = {**row, "value": statistics.median(own for own, _ in times[c])}
    by_contender = {c: by_contender[c] for c in contenders if c in by_contender}
    rows = list(by_contender.values())
    comparisons = [
        _compare(mine, by_contender[mine], rival, by_contender[rival]["ratio"])
        for mine, rival in RIVALS.items()
        if mine in by_contender and rival in by_contender
    ]
    clock = "CPU time" if _clock(mode, args.device) == "cpu_s" else "wall-clock time"
    title = f"### {DESCRIPTIONS[case]}, {'1 process' if mode == 'single' else 'DDP on 2 processes'} ({clock})"
    hands = [own for times in measured.values() for own, _ in times["hand"]]
    baseline = ("hand-written loop", statistics.median(hands))
    table = ratio_table(rows, baseline, "ms per step", lambda v: f"{v * 1e3:.3f}")
    return [title, "", *table, "", *comparisons, ""], [
        {**r, "case": f"{case} {mode} {c}"} for c, r in by_contender.items()
    ]


def _compare(mine: str, row: dict[str, Any], rival: str, theirs: float) -> str:
    """A line comparing ember's ratio with its Lightning counterpart's, by the 90% interval of
    ember's median: below, where the rival's ratio lies above it; NOT below, where it lies under
    it; tied otherwise (this run cannot order them, whichever median is lower). Without an interval
    (too few rounds), the medians decide. (The rival's own noise, over fewer rounds, is not counted.)"""
    ours, interval = row["ratio"], row.get("interval")
    if interval is None:
        verdict = "below" if ours < theirs else "**NOT below**"
    elif theirs > interval[1]:
        verdict = "below"
    elif theirs < interval[0]:
        verdict = "**NOT below**"
    else:
        verdict = f"tied (undecided: {theirs:.3f} is inside the 90% interval of ember's median)"
    return f"- {LABELS[mine]} {ours:.3f} vs {LABELS[rival]} {theirs:.3f}: {verdict}."


def report(args: argparse.Namespace) -> str:
    contenders = ["hand", *(c for c in dict.fromkeys(args.contenders) if c != "hand")]
    skipped = {c: p for c in contenders if (p := missing_package(c)) is not None}
    running = [c for c in contenders if c not in skipped]
    notes = [
        f"- {LABELS[c]}: skipped, `{p}` is not installed (`pip install -e '.[bench]'`)."
        for c, p in skipped.items()
    ]
    modes = list(dict.fromkeys(args.modes))
    if args.device == "cuda" and "ddp" in modes and torch.cuda.device_count() < 2:
        modes.remove("ddp")
        notes.append(f"- DDP: skipped, it needs 2 GPUs and this machine has {torch.cuda.device_count()}.")
    lines, rows = [], []
    for case in dict.fromkeys(args.cases):
        for mode in modes:
            case_lines, case_rows = _case(case, mode, running, args)
            lines += case_lines
            rows += case_rows
    record_ratios(args.name, rows, args.ratios)
    over = [r["case"] for r in rows if r["budget"] is not None and r["ratio"] > r["budget"]]
    behind = [line for line in lines if "NOT below" in line]
    verdict = "Every ember ratio is within its budget." if not over else f"Over budget: {', '.join(over)}."
    tied = [line for line in lines if ": tied (" in line]
    if not behind and not tied:
        verdict += " Every ember ratio is below its Lightning counterpart."
    if behind:
        verdict += f" Not below Lightning: {len(behind)} comparison(s)."
    if tied:
        verdict += f" Tied with Lightning within this run's noise: {len(tied)} comparison(s)."
    packages = sorted({NEEDS[c] for c in running if c in NEEDS})
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages) or "none installed"
    where = (
        host("cuda") + " bf16-mixed, NCCL for DDP."
        if args.device == "cuda"
        else host() + " gloo, 1 thread per process."
    )
    cases = list(dict.fromkeys(args.cases))
    steps = " / ".join(f"{_steps(c, args)} ({c})" for c in cases)
    return "\n".join([
        f"## Step overhead{' on CUDA' if args.device == 'cuda' else ''}: ember vs a hand-written loop, Lightning and Accelerate",
        "",
        f"{steps} timed steps after {args.warmup} warm-up steps per run; AdamW. Each process trains the "
        f"hand-written loop and its contenders (ember's Accelerator and Trainer together; each rival in its own "
        f"process) in alternating rounds (A B C, B C A, ...): ember's {args.rounds} rounds spread over "
        f"{min(args.processes, args.rounds)} fresh processes (a process keeps an offset of its own for its whole life), "
        f"{min(args.rounds, args.rival_rounds)} for each rival, whose ratios need only be told apart from ember's; "
        "each run a fresh model, optimizer and "
        "trainer. Every run is paced: before each of its steps the hand-written loop takes a step on its own copy "
        "of the model and data, timed apart, and the run's speed is its time per step over its pacer's (a change "
        "of the machine's speed during the run hits both alike). A ratio is a contender's speed over the "
        "hand-written loop's, paced the same way in the same round of the same process (median, and spread over "
        "the rounds); the ms per step are the runs' own, less their pacers'. CPU time for one process on the CPU "
        "(one thread: the cost of the step, whatever else the machine runs), wall-clock time for DDP and on CUDA. "
        "`instructions.py` (its own section) counts the instructions of the same steps, which do not move. "
        "Budgets: ember Accelerator <= 1.01, ember Trainer <= 1.02, each below its Lightning counterpart (Fabric; "
        "the Trainer with its defaults). Both Trainers run with their defaults (checkpointing, logger, progress "
        "bar, model summary; ember's non-finite guard) and log the loss every step; progress bars print to a "
        "file, not a terminal.",
        where,
        f"Other frameworks: {versions}.",
        "",
        *lines,
        *notes,
        f"**{verdict}**",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per run (default: per case, STEPS)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timing starts")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of ember's contenders")
    parser.add_argument(
        "--processes", type=int, default=3, help="fresh processes ember's rounds are spread over"
    )
    parser.add_argument(
        "--rival-rounds", type=int, default=3, help="alternating rounds in each rival's process"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="single-process CPU runs at once (each timed by its own CPU time)")  # fmt: skip
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)  # a worker's log directory
    run_main(parser, "step_overhead", list(GROUPS), worker, report, quick={"steps": 20, "warmup": 5, "rounds": 2, "processes": 1},
             devices=("cpu", "cuda"))  # fmt: skip


if __name__ == "__main__":
    main()
