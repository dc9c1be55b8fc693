"""Start-up: ``import ember`` vs ``import torch``, and the time from ``python train.py`` to the end of
the first training step, ember vs a hand-written loop (and Lightning when installed).

    python benchmarks/startup.py                      # updates benchmarks/RESULTS.md
    python benchmarks/startup.py --quick --results /tmp/R.md --ratios /tmp/ratios

Imports: every repetition starts a fresh interpreter per package (ember, lightning, accelerate),
alternating, which times ``import torch`` and then ``import X``: the time of ``import X`` is their
sum (each of these packages imports torch first), and its ratio to ``import torch`` is taken inside
the one process. Two fresh interpreters importing the same torch differ by 10-30% here (page cache,
collections of the garbage collector, the other core's load); one process's two imports share all
of that. Budget: ember <= 1.05 x torch.

First step: every contender of ``_contenders.py`` trains the same small MLP in a fresh process (this
script is its ``train.py``). The time runs from just before the process is started to the end of
its first optimizer step (a global optimizer hook reads the clock, then the process exits), so
it holds the interpreter's start, the imports, building the model and the framework's set-up.
Budget: the ember Accelerator and Trainer <= 1.02 x the hand-written loop. The part every contender
shares, the interpreter's start, ``import torch`` and ``torch._dynamo`` (which every first optimizer
step imports; the worker imports it first) (``shared_wall``, read once this script's imports are done), varies
by a few hundred ms between processes, more than the 2% budget; the budgeted ratio therefore puts
the run's median of that part in place of each process's own:
``(median torch part + contender's rest) / (median torch part + hand loop's rest)``, paired by
repetition. The plain ratios of the whole times are shown beside it.

Children run with Python's bytecode cache on, as an installed package does (``_common.child_env``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # (every contender's first optimizer step imports it: part of the shared cost)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, child_env, host, pick, ratio_row, ratio_table, record_ratios, run_main, seconds
from _contenders import missing_package, spawn, write_result

# A worker's shared part ends here: the interpreter's start, import torch (and torch._dynamo, which
# the first optimizer step would import), this script's modules.
_SHARED_WALL, _SHARED_CPU = time.time(), time.process_time()

PACKAGES = ("torch", "ember", "lightning", "accelerate")
CONTENDERS = ("hand", "accelerator", "trainer", "lightning", "accelerate")
IMPORT_BUDGET = {"ember": 1.05}
FIRST_STEP_BUDGET = {"accelerator": 1.02, "trainer": 1.02}
_TIME_IMPORT = (
    "import time; t = time.perf_counter(); import torch; u = time.perf_counter(); import {0}; "
    "print(u - t, time.perf_counter() - u)"
)


def import_seconds(package: str) -> tuple[float, float]:
    """Seconds of ``import torch`` and then of ``import package`` in one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _TIME_IMPORT.format(package)], env=child_env(),
                          capture_output=True, text=True, check=True)  # fmt: skip
    torch_s, rest_s = done.stdout.split()[-2:]
    return float(torch_s), float(rest_s)


def worker(args: argparse.Namespace) -> None:
    """One contender in this fresh process, until its first optimizer step ends."""
    from _contenders import Run, measure
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def first_step(*_: object) -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()
        # CPU time since the process started: less disturbed than wall time by a busy machine.
        write_result(args.out, {"wall": time.time() - args.t0, "cpu": time.process_time(),
                                "shared_wall": _SHARED_WALL - args.t0, "shared_cpu": _SHARED_CPU})  # fmt: skip
        os._exit(0)  # the run's remaining steps and its tear-down are not part of the start-up

    register_optimizer_step_post_hook(first_step)
    measure(args.worker, Run(case="mlp", warmup=1, steps=1, device=args.device, root=args.root))
    raise SystemExit("the run ended without an optimizer step")


def first_step(contender: str, device: str) -> dict[str, float]:
    argv = ["--worker", contender, "--device", device, "--t0", repr(time.time())]
    return spawn(__file__, argv, nproc=1)[0]


def report(args: argparse.Namespace) -> str:
    cuda = args.device == "cuda"
    lines = [f"## Start-up{' on CUDA' if cuda else ''}: import and time to the first step", ""]
    rows: list[dict[str, Any]] = []
    if not cuda:  # an import does not depend on the device
        packages = [
            p for p in pick(args.packages, PACKAGES, "torch") if p == "ember" or not missing_package(p)
        ]
        times = alternate(packages[1:], args.import_reps, import_seconds)
        imports = [
            ratio_row(
                f"import {p}", [a + b for a, b in times[p]], [a for a, _ in times[p]], IMPORT_BUDGET.get(p)
            )
            for p in packages[1:]
        ]  # (each ratio inside one process: import torch, then the rest of import X)
        rows += imports
        torch_s = statistics.median(a for p in packages[1:] for a, _ in times[p])
        lines += [
            f"`import X` in a fresh interpreter, {args.import_reps} alternating repetition(s) after one unrecorded "
            "round, each timing `import torch` and then `import X` in the same interpreter: `import X` costs "
            "their sum, and its ratio to `import torch` is taken inside the process (two interpreters' imports "
            "of torch differ by 10-30% here). Not installed, left out: "
            f"{', '.join(p for p in PACKAGES if missing_package(p)) or 'none'}.",
            "",
            *ratio_table(imports, ("import torch", torch_s), "time", seconds),
            "",
        ]
    contenders = [c for c in pick(args.contenders, CONTENDERS, "hand") if not missing_package(c)]
    runs = alternate(contenders, args.step_reps, lambda c: first_step(c, args.device))
    wall = {c: [r["wall"] for r in runs[c]] for c in contenders}
    cpu = {c: [r["cpu"] for r in runs[c]] for c in contenders}
    # The shared part (interpreter start and import torch) at the run's median; each process's rest.
    shared = statistics.median(r["shared_wall"] for c in contenders for r in runs[c])
    steadied = {c: [shared + r["wall"] - r["shared_wall"] for r in runs[c]] for c in contenders}
    firsts = [
        ratio_row(f"first step: {c}", steadied[c], steadied["hand"], FIRST_STEP_BUDGET.get(c))
        for c in contenders[1:]
    ]
    plain = [ratio_row(f"first step, whole time: {c}", wall[c], wall["hand"], None) for c in contenders[1:]]
    cpus = [ratio_row(f"first step, CPU time: {c}", cpu[c], cpu["hand"], None) for c in contenders[1:]]
    rows += firsts
    lines += [
        f"From starting `python train.py` to the end of the first optimizer step, on {args.device}: the MLP of "
        f"`_contenders.py` (AdamW, batch 64), each contender in a fresh process, {args.step_reps} alternating "
        "repetition(s) after one unrecorded round. The Trainer runs with its defaults (progress bar, model "
        "summary, CSV logger, checkpointing). Every contender pays for torch's own start: `import torch`, and "
        "`torch._dynamo`, which the first optimizer imports. The budgeted ratio puts the run's median of the part "
        f"every process shares (the interpreter's start and `import torch`: {seconds(shared)}) in place of each "
        "process's own, which varies by more than the budget; the whole times' plain ratios follow it.",
        "",
        *ratio_table(firsts, ("first step: hand", statistics.median(steadied["hand"])), "time", seconds),
        "",
        *ratio_table(
            plain, ("first step, whole time: hand", statistics.median(wall["hand"])), "time", seconds
        ),
        "",
        "The CPU time each process used until then (less disturbed than wall time on a busy machine):",
        "",
        *ratio_table(
            cpus, ("first step, CPU time: hand", statistics.median(cpu["hand"])), "CPU time", seconds
        ),
        "",
        host(args.device),
    ]
    record_ratios(args.name, rows, args.ratios)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--import-reps", type=int, default=5)
    parser.add_argument("--step-reps", type=int, default=5)  # 5: the fewest with an interval
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated; torch always runs")
    parser.add_argument(
        "--contenders",
        default="hand,accelerator,trainer,lightning",
        help=f"comma-separated, among {', '.join(CONTENDERS)}; hand always runs",
    )
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    run_main(parser, "startup", CONTENDERS, worker, report, quick={"import_reps": 1, "step_reps": 1},
             devices=("cpu", "cuda"))  # fmt: skip


if __name__ == "__main__":
    main()
