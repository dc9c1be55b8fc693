"""Peak memory of a training run: the ember Trainer and Accelerator vs a hand-written loop (and
Lightning, Accelerate when installed), each in a fresh process.

    python benchmarks/memory.py                       # updates benchmarks/RESULTS.md
    python benchmarks/memory.py --quick --results /tmp/R.md --ratios /tmp/ratios

Every contender of ``_contenders.py`` trains the same model for the same steps; the process then
reports its peak resident set size (``ru_maxrss``), and on CUDA the peak of the memory torch
allocated on the GPU. Repetitions alternate the contenders. Budget: ember <= 1.05 x the hand loop.
The per-rank training state of DDP, FSDP and ZeRO-1/2/3 is measured by ``fsdp_memory.py`` and
``zero_memory.py``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, forward, host, pick, ratio_row, ratio_table, record_ratios, run_main
from _contenders import missing_package, spawn, write_result

CONTENDERS = ("hand", "accelerator", "trainer", "lightning", "accelerate")
BUDGET = {"accelerator": 1.05, "trainer": 1.05}


def worker(args: argparse.Namespace) -> None:
    import torch
    from _contenders import Run, measure

    measure(
        args.worker,
        Run(case=args.case, warmup=args.warmup, steps=args.steps, device=args.device, root=args.root),
    )
    peak = {"rss": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}  # Linux: KiB
    if args.device == "cuda":
        peak["cuda"] = float(torch.cuda.max_memory_allocated())
    write_result(args.out, peak)


def report(args: argparse.Namespace) -> str:
    contenders = [c for c in pick(args.contenders, CONTENDERS, "hand") if not missing_package(c)]
    argv = forward(args, ["case", "warmup", "steps", "device"])
    # Peak memory does not depend on a warm cache: no unrecorded round.
    peaks = alternate(
        contenders, args.reps, lambda c: spawn(__file__, ["--worker", c, *argv], nproc=1)[0], warm=False
    )
    kinds = [("rss", "peak RSS")] + ([("cuda", "peak CUDA memory")] if args.device == "cuda" else [])
    lines = [
        f"## Peak memory of a training run{' on CUDA' if args.device == 'cuda' else ''}: ember vs a hand-written loop",
        "",
        f"The `{args.case}` case of `_contenders.py`, {args.warmup + args.steps + 1} AdamW steps, each contender in "
        f"a fresh process, {args.reps} alternating repetition(s). Not installed, left out: "
        f"{', '.join(c for c in CONTENDERS if missing_package(c)) or 'none'}.",
    ]
    rows: list[dict[str, Any]] = []
    for kind, title in kinds:
        values = {c: [p[kind] for p in peaks[c]] for c in contenders}
        ratios = [
            ratio_row(f"{title}: {c}", values[c], values["hand"], BUDGET.get(c)) for c in contenders[1:]
        ]
        baseline = (f"{title}: hand", statistics.median(values["hand"]))
        lines += ["", *ratio_table(ratios, baseline, "MB", lambda v: f"{v / 1e6:.0f}")]
        rows += ratios
    lines += [
        "",
        "The model is small: the peaks are mostly the Python and torch runtime, so the ratios show what a "
        "framework adds around the same training (its modules, objects, logging and progress display).",
        host(args.device),
    ]
    record_ratios(args.name, rows, args.ratios)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated; hand always runs"
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    run_main(
        parser, "memory", CONTENDERS, worker, report, quick={"steps": 5, "reps": 1}, devices=("cpu", "cuda")
    )


if __name__ == "__main__":
    main()
