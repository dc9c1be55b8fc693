"""The phase benchmark runs (tiny settings) and writes its section: every phase of every contender,
with its difference from the hand-written loop. Times are reported, never asserted."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from dist_helpers import load_benchmark


def test_phases_of_every_contender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in ("lightning", "accelerate"):  # as where the bench extra is not installed
        monkeypatch.setitem(sys.modules, package, None)
    module = load_benchmark("phases")
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    argv = ["phases.py", "--quick", "--results", str(results), "--ratios", str(ratios)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    text = results.read_text()
    assert "<!-- phases:start -->" in text and "Other frameworks: none installed." in text
    assert "- Lightning Fabric: skipped, `lightning` is not installed" in text
    header = "| phase | hand-written loop | ember Accelerator | ember Trainer (defaults) |"
    assert header in text
    for label in [*module.PHASES.values(), "**framework phases***", "**whole step**"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 3 and float(cells[0]) > 0, row
        # every contender: its time, then its difference from the hand loop of its process
        assert all(re.fullmatch(r"\d+\.\d \([+-]\d+\.\d\)", c) for c in cells[1:]), row
    assert json.loads((ratios / "phases.json").read_text()) == []


def test_phases_come_from_the_events_in_order() -> None:
    module = load_benchmark("phases")
    recorder = module.Recorder()
    # Events 10 ns apart, then 30 ns apart: each phase is the mean of the fastest 90% of the steps.
    recorder.steps = [
        [(event, gap * i) for i, event in enumerate([*module.EVENTS, "next"])] for gap in [10] * 9 + [30]
    ]
    assert recorder.phases() == {event: 0.01 for event in module.EVENTS}
    # The optimizer's step before the backward (as in Lightning's closure): not these phases.
    events = ["forward", "forward_end", "step", "backward", "backward_end", "step_end", "batch", "batch_end"]
    recorder.steps = [[(event, i) for i, event in enumerate([*events, "next"])]]
    with pytest.raises(
        RuntimeError, match="does not run forward, backward, optimizer step and the next batch"
    ):
        recorder.phases()
