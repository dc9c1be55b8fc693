"""The instruction-count benchmark runs (tiny settings, under callgrind where Valgrind is installed)
and writes its section and ratio file; without Valgrind it says why and records nothing. Counts
are reported by the benchmark, never held to a budget here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from dist_helpers import load_benchmark


def _run(module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[dict]]:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    argv = ["instructions.py", "--quick", "--results", str(results), "--ratios", str(ratios)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    return results.read_text(), json.loads((ratios / "instructions.json").read_text())


@pytest.mark.bench
def test_counts_instructions_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("instructions")
    if module.unavailable() is not None:  # the other branch is tested below, on every machine
        pytest.skip(f"callgrind unavailable: {module.unavailable()}")
    text, rows = _run(module, tmp_path, monkeypatch)
    assert "<!-- instructions:start -->" in text and "### MLP 128-256-256-10, batch 64, 1 process" in text
    assert [(r["case"], r["budget"]) for r in rows] == [("mlp accelerator", 1.01)]
    # The same model, data and optimizer: the kernels dominate both counts.
    assert rows[0]["value"] > 100_000 and 0.8 < rows[0]["ratio"] < 1.25


def test_without_valgrind_the_section_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("instructions")
    monkeypatch.setattr(module, "callgrind_unavailable", lambda: "`valgrind` is not installed")
    text, rows = _run(module, tmp_path, monkeypatch)
    assert "Not measured: `valgrind` is not installed." in text and rows == []
