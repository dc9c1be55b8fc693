"""The ZeRO memory benchmark counts what it says: per-rank parameters, gradients, fp32 master copies and
optimizer state, each byte once, and what it measures on 2 ranks (tiny settings) is the arithmetic on
paper from the parameter count. Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import PYTHON, REPO, run_command

SCRIPT = REPO / "benchmarks" / "zero_memory.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("zero_memory", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zero_memory", module)
    spec.loader.exec_module(module)
    return module


def test_expected_bytes_per_parameter() -> None:
    zm = _script()
    n = 1000

    def per_param(strategy: str, precision: str, whole: int = 0) -> float:
        return float(sum(zm.expected_bytes(strategy, precision, n, whole).values())) / n

    # DDP: fp32 parameter + gradient + two AdamW moments, in both precisions (bf16-mixed is autocast)
    assert per_param("ddp", "32-true") == per_param("ddp", "bf16-mixed") == 16
    # bf16-mixed on 2 ranks: ZeRO-3 (2 + 2 + 4 + 8) / 2 = 8, half of DDP: the budgeted row
    assert per_param("deepspeed_stage_3", "bf16-mixed") == 8 and 8 / 16 <= zm.MEMORY_BUDGET
    assert per_param("deepspeed_stage_1", "bf16-mixed") == per_param("deepspeed_stage_2", "bf16-mixed") == 9
    # fp32: DeepSpeed's master partition is a second fp32 copy of ZeRO-3's parameter partition
    assert per_param("deepspeed_stage_3", "32-true") == 10
    assert per_param("deepspeed_stage_1", "32-true") == per_param("deepspeed_stage_2", "32-true") == 12
    # parameters ZeRO-3 keeps whole add their full size beside their partition
    assert per_param("deepspeed_stage_3", "bf16-mixed", whole=100) == 8 + 2 * 100 / n
    assert zm.BUDGETED == ("bf16-mixed", "deepspeed_stage_3")


def test_distinct_bytes_counts_shared_memory_once() -> None:
    zm = _script()
    flat = torch.zeros(100)  # 400 bytes
    views = [flat[:50], flat[50:]]
    other = torch.zeros(10, dtype=torch.bfloat16)  # 20 bytes
    counted = zm.distinct_bytes(
        {"params": views, "grads": [None, other, other[:5]], "master": [flat], "optimizer": [torch.zeros(0)]}
    )
    assert counted == {"params": 400, "grads": 20, "master": 0, "optimizer": 0}
    half = zm.distinct_bytes({"a": [flat[:50]], "b": [flat[25:75]]})
    assert half == {"a": 200, "b": 100}


@pytest.mark.bench
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero_memory_benchmark_measures_the_arithmetic(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    old = "<!-- zero_memory:start -->\nOLD\n<!-- zero_memory:end -->"
    results.write_text(f"# results\n\nkept\n\n{old}\n\ntail\n")
    cmd = [PYTHON, str(SCRIPT), "--quick", "--strategies", "deepspeed_stage_3", "--results", str(results),
           "--ratios", str(ratios)]  # fmt: skip
    result = run_command(cmd, timeout=600)  # the first DeepSpeed start on a machine compiles its comm op
    assert result.returncode == 0, result.stderr[-6000:]
    text = results.read_text()  # its section replaced, the rest of the file kept
    assert text.startswith("# results\n\nkept\n") and text.endswith("\n\ntail\n") and "OLD" not in text
    for precision in ("32-true", "bf16-mixed"):
        assert f"| {precision} | ddp |" in text and f"| {precision} | deepspeed_stage_3 |" in text
    rows = {row["case"]: row for row in json.loads((ratios / "zero_memory.json").read_text())}
    fp32 = rows["per-rank state: deepspeed_stage_3 / ddp (32-true)"]
    bf16 = rows["per-rank state: deepspeed_stage_3 / ddp (bf16-mixed)"]
    for row in (
        fp32,
        bf16,
    ):  # bytes do not vary between repetitions; measured = paper (AdamW's step counters aside)
        assert row["low"] == row["high"] == row["ratio"]
        assert abs(row["ratio"] - row["expected"]) < 1e-3, row
    assert fp32["budget"] is None and bf16["budget"] == 0.525
    assert fp32["ratio"] > bf16["ratio"]  # fp32's duplicate master partition
    assert f"deepspeed_stage_3 / ddp (bf16-mixed): {bf16['ratio']:.3f}" in text
    steps = [row for case, row in rows.items() if case.startswith("step time")]
    assert len(steps) == 2 and all(r["budget"] is None and r["low"] <= r["ratio"] <= r["high"] for r in steps)
