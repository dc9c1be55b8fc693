"""The checkpoint benchmark runs (tiny settings, and FSDP on 2 ranks) and reports consistent sizes and
ratio rows; timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dist_helpers import PYTHON, REPO, run_command


@pytest.mark.bench
def test_checkpoint_benchmark_compares_the_same_state(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    cmd = [PYTHON, str(REPO / "benchmarks" / "checkpoint.py"), "--quick", "--reps", "1",
           "--results", str(results), "--ratios", str(ratios), "--dir", str(tmp_path)]  # fmt: skip
    done = run_command(cmd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    sizes = re.search(
        r"([\d.]+) MB of tensors on cpu; files: ember ([\d.]+) MB, torch.save ([\d.]+) MB", text
    )
    assert sizes is not None, text
    state, ours, theirs = (float(v) for v in sizes.groups())
    assert abs(state - 0.4) < 0.05  # 2 x Linear(128, 128) with Adam's two moments: 3 x 132 KB (fp32)
    assert state <= ours <= state + 0.1 and state <= theirs <= state + 0.1  # the same tensors, plus headers
    rows = {r["case"]: r for r in json.loads((ratios / "checkpoint.json").read_text())}
    assert rows["ember save_state"]["budget"] == 1.2 and rows["ember load_state"]["budget"] == 1.2
    assert {"torch.save", "torch.save + fsync + xxh3", "torch.load + xxh3"} <= rows.keys()
    assert {"ember sharded save_state", "ember sharded load_state"} <= rows.keys()  # the 2-rank FSDP part
    assert "| rank-0 torch.save + fsync (baseline) |" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ember-bench-")] == []  # cleaned up


@pytest.mark.bench
def test_checkpoint_benchmark_refuses_a_count_below_one() -> None:
    cmd = [PYTHON, str(REPO / "benchmarks" / "checkpoint.py"), "--best-of", "0"]
    done = run_command(cmd, timeout=120)
    assert done.returncode == 2 and "argument --best-of: must be an int >= 1, got '0'" in done.stderr
