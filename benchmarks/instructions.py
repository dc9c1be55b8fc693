"""Step overhead in instructions: what each contender executes per training step, counted by
Valgrind's callgrind, over the hand-written loop's count. One run per contender: counts barely move.

    python benchmarks/instructions.py                    # updates benchmarks/RESULTS.md
    python benchmarks/instructions.py --contenders hand accelerator trainer fabric lightning   # the rivals too

By default the hand-written loop, the ember Accelerator and the ember Trainer: Lightning's modules
take minutes to import under Valgrind, and its ratios (shown by ``step_overhead.py``) are far
enough from ember's that time tells them apart.
    python benchmarks/instructions.py --quick --results /tmp/R.md --ratios /tmp/ratios

Why a second measure of the step overhead: the budgets (ember Accelerator <= 1.01x, Trainer <=
1.02x the hand-written loop) are finer than the noise of a time on a shared machine. On this
project's 2-core VM the CPU time of one step moves by 10-30% between two processes running the
same code, so ``step_overhead.py``'s medians cannot tell 1.01 from 1.05. An instruction count
barely moves: two runs of the same program agree to about 0.1%, whatever else the machine does. It counts work, not time (a cache miss costs no more than a hit), which is the
right measure of framework overhead: Python code that runs around the same kernels.

Each contender trains as in ``_contenders.py`` (same model, data, optimizer, one thread) under
``valgrind --tool=callgrind`` with instrumentation off until the forward of batch ``warmup``
starts; a tiny C shim, compiled here against ``valgrind/callgrind.h``, switches counting on there
and off at the forward of batch ``warmup + steps``: the count covers ``steps`` whole steps (data
loading, forward, backward, optimizer, the framework's hooks, logging, progress bar) and nothing
of start-up. The contenders are dealt out to two processes (this machine has 2 cores), each
running its contenders one after the other: under Valgrind, importing torch and the frameworks is
most of a process's time, paid once per process. Single process only: under DDP a
rank's count would include gloo's waiting, which is not overhead. Needs ``valgrind`` and a C
compiler; without them the section says so and records nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import callgrind_unavailable, child_env, host, record_ratios, run_main
from _contenders import (
    BUDGETS,
    CONTENDERS,
    DESCRIPTIONS,
    LABELS,
    NEEDS,
    RIVALS,
    Clock,
    Run,
    measure,
    missing_package,
    write_result,
)

CASES = ("mlp",)  # the GPT under callgrind ran for more than 8 minutes without finishing a run
SHIM = r"""#include <valgrind/callgrind.h>
void ember_bench_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void ember_bench_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT("window"); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def worker(args: argparse.Namespace) -> None:
    """Contenders' runs under callgrind, one after the other in this process: the shim brackets
    each run's timed window of ``Clock`` and dumps its count (callgrind numbers the dumps)."""
    shim = ctypes.CDLL(args.shim)
    original = Clock.forward

    def forward(self: Clock, x: Any) -> Any:
        if self.calls == self.start:
            shim.ember_bench_start()
        elif self.calls == self.stop:
            shim.ember_bench_stop()
        return original(self, x)

    Clock.forward = forward  # type: ignore[method-assign]
    for contender in args.contenders:
        run = Run(case=args.cases[0], warmup=args.warmup, steps=args.steps, root=f"{args.root}/{contender}")
        measure(contender, run)
    write_result(args.out, {})


def unavailable() -> str | None:
    """Why the counts cannot be taken on this machine, or None."""
    return callgrind_unavailable()


def _build_shim(directory: Path) -> Path:
    source, library = directory / "shim.c", directory / "shim.so"
    source.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    return library


def count(contenders: list[str], case: str, args: argparse.Namespace, shim: Path) -> list[float]:
    """Instructions per step of one run of each of ``contenders`` on ``case``, in one fresh process
    (torch and the frameworks are imported once, under Valgrind the largest part of a run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                   f"--callgrind-out-file={out}.%p", sys.executable, __file__, "--worker", "runs", "--contenders",
                   *contenders, "--cases", case, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--shim", str(shim), "--out", str(Path(tmp) / "result"), "--root", tmp]  # fmt: skip
        log = Path(tmp) / "output.log"
        with open(log, "wb") as sink:
            done = subprocess.run(command, env=child_env(PYTHONWARNINGS="ignore"), stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=1800, check=False)  # fmt: skip
        # One dump per window, numbered from 1 in the order the contenders ran.
        dumps = sorted(Path(tmp).glob("callgrind.*.*"), key=lambda p: int(p.suffix[1:]))
        if done.returncode != 0 or len(dumps) != len(contenders):
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{contenders} on {case} under callgrind failed ({done.returncode}):\n{tail}")
        return [_total(dump) / args.steps for dump in dumps]


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {dump}")


def report(args: argparse.Namespace) -> str:
    title = "## Step overhead in instructions (callgrind): ember vs a hand-written loop"
    why = unavailable()
    if why is not None:
        record_ratios(args.name, [], args.ratios)
        return f"{title}\n\nNot measured: {why}. The budgets below are then judged on `step_overhead.py`'s times."
    contenders = ["hand", *(c for c in dict.fromkeys(args.contenders) if c != "hand")]
    running = [c for c in contenders if missing_package(c) is None]
    # ``--jobs`` processes per case, the contenders dealt out among them.
    groups = [(running[i :: args.jobs], case) for case in dict.fromkeys(args.cases) for i in range(args.jobs)]
    groups = [(members, case) for members, case in groups if members]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        shim = _build_shim(Path(tmp))
        counted = pool.map(lambda group: count(*group, args, shim), groups)
        counts = {(c, case): n for (members, case), ns in zip(groups, counted, strict=True)
                  for c, n in zip(members, ns, strict=True)}  # fmt: skip
    lines, rows = [], []
    for case in dict.fromkeys(args.cases):
        hand = counts["hand", case]
        lines += [f"### {DESCRIPTIONS[case]}, 1 process", "",
                  "| case | instructions per step | ratio to the hand-written loop | budget | verdict |",
                  "|---|---|---|---|---|", f"| hand-written loop (baseline) | {hand:,.0f} | 1 | - | - |"]  # fmt: skip
        ratios = {}
        for contender in running[1:]:
            ratio = ratios[contender] = counts[contender, case] / hand
            budget = BUDGETS.get(contender)
            verdict = "-" if budget is None else "pass" if ratio <= budget else "**OVER**"
            lines.append(f"| {LABELS[contender]} | {counts[contender, case]:,.0f} | {ratio:.4f} | "
                         f"{'-' if budget is None else f'<= {budget:g}'} | {verdict} |")  # fmt: skip
            rows.append({"case": f"{case} {contender}", "ratio": ratio, "low": ratio, "high": ratio,
                         "budget": budget, "value": counts[contender, case]})  # fmt: skip
        lines.append("")
        for mine, rival in RIVALS.items():
            if mine in ratios and rival in ratios:
                below = "below" if ratios[mine] < ratios[rival] else "**NOT below**"
                lines.append(
                    f"- {LABELS[mine]} {ratios[mine]:.4f} vs {LABELS[rival]} {ratios[rival]:.4f}: {below}."
                )
        lines.append("")
    record_ratios(args.name, rows, args.ratios)
    over = [r["case"] for r in rows if r["budget"] is not None and r["ratio"] > r["budget"]]
    packages = sorted({NEEDS[c] for c in running if c in NEEDS})
    versions = (
        ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages) or "not counted (`--contenders`)"
    )
    skipped = [
        f"- {LABELS[c]}: skipped, `{missing_package(c)}` is not installed."
        for c in contenders
        if c not in running
    ]
    verdict = "Every ember ratio is within its budget." if not over else f"Over budget: {', '.join(over)}."
    return "\n".join([
        title, "",
        f"Instructions executed per step over {args.steps} steps after {args.warmup} warm-up steps, one run per "
        f"contender, the contenders dealt out to {args.jobs} process(es) that run theirs one after the other (two "
        "runs of the same program agree to about 0.1%), one thread, AdamW; the Trainers with their defaults, logging the "
        "loss every step. Counted by callgrind: user-space instructions of the whole process (every thread) "
        "inside the window, torch's kernels included, so a ratio is (kernels + framework) / (kernels + hand loop).",
        f"{host()} {_valgrind_version()}.",
        f"Other frameworks: {versions}.", "",
        *lines, *skipped, f"**{verdict}**",
    ])  # fmt: skip


def _valgrind_version() -> str:
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "valgrind"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS,
                        default=["hand", "accelerator", "trainer"])  # fmt: skip
    parser.add_argument("--steps", type=int, default=40, help="counted steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the count starts")
    parser.add_argument(
        "--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="processes at once"
    )
    parser.add_argument("--shim", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)
    run_main(parser, "instructions", ["runs"], worker, report,
             quick={"steps": 3, "warmup": 2, "cases": ["mlp"], "contenders": ["hand", "accelerator"]})  # fmt: skip


if __name__ == "__main__":
    main()
