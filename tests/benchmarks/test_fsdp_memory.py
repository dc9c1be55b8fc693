"""The FSDP memory benchmark runs (tiny settings) and its sharding arithmetic holds: FSDP keeps half
of DDP's per-rank training state. Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import PYTHON, REPO, run_command


@pytest.mark.bench
def test_fsdp_memory_benchmark_writes_its_section(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    old = "<!-- fsdp_memory:start -->\nOLD\n<!-- fsdp_memory:end -->"
    results.write_text(f"# results\n\nkept\n\n{old}\n\ntail\n")
    cmd = [PYTHON, str(REPO / "benchmarks" / "fsdp_memory.py"), "--quick", "--results", str(results),
           "--ratios", str(ratios)]  # fmt: skip
    result = run_command(cmd, timeout=300)
    assert result.returncode == 0, result.stderr
    text = results.read_text()  # its section replaced, the rest of the file kept
    assert text.startswith("# results\n\nkept\n") and text.endswith("\n\ntail\n") and "OLD" not in text
    ratio = float(text.split("Memory ratio FSDP / DDP: ")[1].split("*")[0])
    assert ratio <= 0.525
    assert "| fsdp |" in text and "| ddp |" in text
    memory, step = json.loads((ratios / "fsdp_memory.json").read_text())
    assert memory["case"] == "per-rank training state: fsdp / ddp" and memory["budget"] == 0.525
    assert abs(memory["ratio"] - ratio) < 1e-3 and memory["low"] == memory["high"] == memory["ratio"]
    assert step["budget"] is None and step["low"] <= step["ratio"] <= step["high"]
