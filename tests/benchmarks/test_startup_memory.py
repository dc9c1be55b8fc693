"""The start-up and peak-memory benchmarks run (tiny settings) and write their sections and ratio
files; the tests check the bookkeeping (rows, budgets, arithmetic), never the timings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dist_helpers import PYTHON, REPO, run_command

BENCH = REPO / "benchmarks"


def _run(script: str, tmp_path: Path, *argv: str) -> tuple[str, list[dict]]:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    cmd = [
        PYTHON,
        str(BENCH / f"{script}.py"),
        "--quick",
        *argv,
        "--results",
        str(results),
        "--ratios",
        str(ratios),
    ]
    done = run_command(cmd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert f"<!-- {script}:start -->" in text and f"<!-- {script}:end -->" in text
    assert sorted(p.name for p in ratios.iterdir()) == [f"{script}.json"]
    return text, json.loads((ratios / f"{script}.json").read_text())


def _check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert row["ratio"] > 0 and row["low"] <= row["ratio"] <= row["high"], row


@pytest.mark.bench
def test_startup_benchmark_times_imports_and_the_first_step(tmp_path: Path) -> None:
    text, rows = _run("startup", tmp_path, "--packages", "ember", "--contenders", "trainer")
    _check_rows(rows)
    assert {r["case"]: r["budget"] for r in rows} == {"import ember": 1.05, "first step: trainer": 1.02}
    assert "| import torch (baseline) |" in text and "| first step: hand (baseline) |" in text
    assert "| first step, CPU time: trainer |" in text  # shown, not recorded as a ratio
    assert "| first step, whole time: trainer |" in text  # the plain ratio, beside the budgeted one
    # The import ratio is taken inside one interpreter: (import torch + the rest) / import torch > 1.
    assert next(r for r in rows if r["case"] == "import ember")["ratio"] > 1


@pytest.mark.bench
def test_memory_benchmark_ratio_is_the_peaks_quotient(tmp_path: Path) -> None:
    text, rows = _run("memory", tmp_path, "--contenders", "trainer")
    ((row,),) = [rows]
    assert row["case"] == "peak RSS: trainer" and row["budget"] == 1.05
    hand = float(re.search(r"\| peak RSS: hand \(baseline\) \| (\d+) \|", text).group(1))  # type: ignore[union-attr]
    trainer = float(re.search(r"\| peak RSS: trainer \| (\d+) \|", text).group(1))  # type: ignore[union-attr]
    assert hand > 50 and trainer > 50  # MB: a process that imported torch
    assert abs(row["ratio"] - trainer / hand) < 0.01  # one repetition: the ratio of the two peaks
