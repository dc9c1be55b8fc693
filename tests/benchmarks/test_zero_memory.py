"""The ZeRO benchmark runs (tiny settings) and reports what partitioning must show: ZeRO-3 holds
less per rank than DDP. Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

from pathlib import Path

from dist_helpers import PYTHON, REPO, run_command


def test_zero_memory_benchmark_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    cmd = [PYTHON, str(REPO / "benchmarks" / "zero_memory.py"), "--layers", "1", "--width", "32", "--heads", "2",
           "--block-size", "16", "--chars", "5000", "--steps", "2", "--reps", "1", "--strategies", "deepspeed_stage_3", "--results", str(results)]  # fmt: skip
    result = run_command(cmd, timeout=600)
    assert result.returncode == 0, result.stderr
    text = results.read_text()
    assert "<!-- zero_memory:start -->" in text and "<!-- zero_memory:end -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| d")}
    assert set(rows) == {"ddp", "deepspeed_stage_3"}
    ratio = float(rows["deepspeed_stage_3"].split("(")[1].split("x")[0])  # total per rank vs DDP
    assert ratio < 1.0
