"""Run the benchmark suite and summarize it (``make bench``).

    python benchmarks/run.py                          # every script, then the summary and the chart
    python benchmarks/run.py --quick                  # small sizes: a smoke test of the whole suite
    python benchmarks/run.py --only startup,checkpoint
    python benchmarks/run.py --device cuda            # the GPU section (sections and files *_cuda)

The suite is every ``benchmarks/*.py`` whose name does not start with ``_`` (this runner aside).
Each is run in its own process with ``--results``, ``--ratios`` (and ``--quick``, ``--device``):
it writes its section of ``RESULTS.md`` and its ratios to ``results/<name>.json``. Then the runner
writes the summary section at the top of ``RESULTS.md`` (date, versions, machine, every ratio
against its budget) and draws ``ratios.png`` (``ratios_cuda.png``) from every ratio file. With
``--device cuda`` only the scripts that have a CUDA variant run (``run_main(..., devices=(..., "cuda"))``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    CONFIDENCE,
    RATIOS,
    RESULTS,
    host,
    interval_text,
    quick_outputs,
    require_cuda,
    verdict,
    write_section,
)

HERE = Path(__file__).resolve().parent
VERSIONS = ("torch", "ember", "lightning", "accelerate", "deepspeed")


def scripts(directory: Path = HERE) -> dict[str, Path]:
    return {
        p.stem: p for p in sorted(directory.glob("*.py")) if not p.name.startswith("_") and p.name != "run.py"
    }


def devices(script: Path) -> tuple[str, ...]:
    """The ``devices`` a script passes to ``run_main`` (read from its source, not imported)."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_main":
            for keyword in node.keywords:
                if keyword.arg == "devices":
                    return tuple(ast.literal_eval(keyword.value))
    return ("cpu",)


def run_script(script: Path, args: argparse.Namespace) -> tuple[bool, float]:
    cmd = [sys.executable, str(script), "--results", str(args.results), "--ratios", str(args.ratios)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--device", "cuda"] if args.device == "cuda" else []
    print(f"== {script.stem}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(
            f"!! {script.stem} failed (exit {done.returncode}) after {seconds:.0f} s:\n{done.stderr[-4000:]}"
        )
    else:
        print(f"   {script.stem}: {seconds:.0f} s", flush=True)
    return done.returncode == 0, seconds


def ratio_files(directory: Path, device: str) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(directory.glob("*.json"))}
    return {n: p for n, p in files.items() if n.endswith("_cuda") == (device == "cuda")}


def summary(
    directory: Path, device: str, chart: str, ran: dict[str, tuple[bool, float]], quick: bool = False
) -> str:
    """The summary section: when, which versions, which machine, and every ratio against its budget."""
    versions = []
    for package in VERSIONS:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    lines = [
        f"## Summary{' (CUDA)' if device == 'cuda' else ''}",
        "",
        f"Updated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `benchmarks/run.py"
        f"{' --device cuda' if device == 'cuda' else ''}`. Versions: {', '.join(versions)}.",
        host(device),
        "",
        "Every ratio is a contender's time, memory or instruction count (`instructions`) over its baseline's, "
        "measured in the same run with the contenders alternating; median and spread over the repetitions (one "
        f"run per contender for instruction counts), and the median's {CONFIDENCE:.0%} interval (bootstrap, from 5 "
        "repetitions): a budget inside it is *undecided* by this run, whatever the verdict. Budget: the median "
        "ratio must not exceed it."
        + (
            " **--quick run: tiny sizes and single repetitions; these ratios say nothing about performance.**"
            if quick
            else ""
        ),
        "",
        f"| benchmark | case | ratio | spread | {CONFIDENCE:.0%} interval | budget | verdict | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, path in ratio_files(directory, device).items():
        when = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        for row in json.loads(path.read_text()):
            budget = "-" if row["budget"] is None else f"<= {row['budget']:g}"
            lines.append(f"| {name} | {row['case']} | {row['ratio']:.3f} | {row['low']:.3f}-{row['high']:.3f} "
                         f"| {interval_text(row)} | {budget} | {verdict(row)} | {when} |")  # fmt: skip
    failed = [name for name, (ok, _) in ran.items() if not ok]
    took = ", ".join(f"{name} {seconds:.0f} s" for name, (_, seconds) in ran.items())
    lines += ["", f"![ratios]({chart})", ""]
    lines += [f"This run: {took}." if took else "This run: no script (summary only)."]
    lines += (
        [f"**Failed: {', '.join(failed)}** (their rows above are from an earlier run, if any)."]
        if failed
        else []
    )
    return "\n".join(lines)


def draw(directory: Path, device: str, path: Path) -> None:
    """One horizontal bar per ratio, whiskers over the spread, the budget as a red mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = []
    for name, file in ratio_files(directory, device).items():
        rows += [{**row, "label": f"{name}: {row['case']}"} for row in json.loads(file.read_text())]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    colors = ["tab:gray" if r["budget"] is None else "tab:green" if r["ratio"] <= r["budget"] else "tab:red"
              for r in rows]  # fmt: skip
    spread = [[r["ratio"] - r["low"] for r in rows], [r["high"] - r["ratio"] for r in rows]]
    ax.barh(y, [r["ratio"] for r in rows], xerr=spread, color=colors, alpha=0.8, capsize=3)
    for yy, row in zip(y, rows, strict=True):  # the median's interval: a thick black bar inside the whiskers
        if row.get("interval") is not None:
            ax.hlines(yy, *row["interval"], color="black", linewidth=3, zorder=2)
    budgets = [(yy, r["budget"]) for yy, r in zip(y, rows, strict=True) if r["budget"] is not None]
    if budgets:
        ax.scatter([b for _, b in budgets], [yy for yy, _ in budgets], marker="|", s=300, color="red",
                   zorder=3, label="budget")  # fmt: skip
        ax.legend(loc="lower right")
    # A few wild ratios (a slow competitor, a noisy spread) would squeeze the rest: the axis stops at
    # 4 and every bar carries its value.
    right = min(4.0, max([2.0, *(r["high"] * 1.1 for r in rows)]))
    for yy, row in zip(y, rows, strict=True):
        ax.text(min(max(row["high"], 0.0), right * 0.9), yy, f"  {row['ratio']:.3f}", va="center", fontsize=7)
    ax.set_xlim(0, right)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel(
        f"ratio to the baseline (median; whiskers: min-max over repetitions; black: the median's {CONFIDENCE:.0%} interval)"
    )
    ax.set_title(
        f"ember benchmarks{' (CUDA)' if device == 'cuda' else ''}: green within budget, red over, gray no budget"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated script names (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to update "
                        "(--quick: build/bench-quick/RESULTS.md)")  # fmt: skip
    parser.add_argument("--ratios", type=Path, default=RATIOS, help="the folder of the ratio files "
                        "(--quick: build/bench-quick/results)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick_outputs(args))
    if args.device == "cuda":
        require_cuda()
    suite = scripts()
    chosen = list(suite) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(suite))
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}. The benchmarks: {', '.join(suite)}")
    ran: dict[str, tuple[bool, float]] = {}
    for name in chosen:
        if args.device in devices(suite[name]):
            ran[name] = run_script(suite[name], args)
        else:
            print(f"-- {name}: no {args.device} variant, skipped")
    chart = args.results.parent / f"ratios{'_cuda' if args.device == 'cuda' else ''}.png"
    args.ratios.mkdir(parents=True, exist_ok=True)
    draw(args.ratios, args.device, chart)
    write_section(args.results, f"summary{'_cuda' if args.device == 'cuda' else ''}",
                  summary(args.ratios, args.device, chart.name, ran, args.quick), first=True)  # fmt: skip
    print(f"Wrote {args.results} and {chart}")
    if any(not ok for ok, _ in ran.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
