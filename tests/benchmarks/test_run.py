"""The benchmark runner: runs the chosen scripts, then writes the summary section first in RESULTS.md
(versions, every ratio file's rows against their budgets) and draws the chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import PYTHON, REPO, load_benchmark, run_command

RUN = REPO / "benchmarks" / "run.py"


@pytest.mark.bench
def test_runner_runs_a_script_then_summarizes_every_ratio_file(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    results.write_text("# results\n\nintro\n\n<!-- old:start -->\nkept\n<!-- old:end -->\n")
    ratios.mkdir()
    other = [{"case": "fast thing", "ratio": 0.9, "low": 0.8, "high": 1.1, "budget": 1.0},
             {"case": "slow thing", "ratio": 1.3, "low": 1.2, "high": 1.4, "budget": 1.3,
              "interval": [1.25, 1.35]},
             {"case": "over thing", "ratio": 1.5, "low": 1.4, "high": 1.6, "budget": 1.0}]  # fmt: skip
    (ratios / "other.json").write_text(json.dumps(other))
    (ratios / "other_cuda.json").write_text(json.dumps([{**other[0], "case": "gpu thing"}]))
    cmd = [
        PYTHON,
        str(RUN),
        "--quick",
        "--only",
        "checkpoint",
        "--results",
        str(results),
        "--ratios",
        str(ratios),
    ]
    done = run_command(cmd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    # The summary goes first (after the introduction), the scripts' sections after it, the rest is kept.
    assert (
        text.index("<!-- summary:start -->")
        < text.index("<!-- old:start -->")
        < text.index("<!-- checkpoint:start")
    )
    summary = text[text.index("<!-- summary:start -->") : text.index("<!-- summary:end -->")]
    assert "| other | fast thing | 0.900 | 0.800-1.100 | - | <= 1 | pass |" in summary
    assert "| other | slow thing | 1.300 | 1.200-1.400 | 1.250-1.350 (undecided) | <= 1.3 | pass |" in summary
    assert "| other | over thing | 1.500 | 1.400-1.600 | - | <= 1 | **OVER** |" in summary
    assert "gpu thing" not in summary  # the CUDA section has its own summary
    assert "| checkpoint | ember save_state |" in summary and "--quick run" in summary
    assert f"torch {torch.__version__}" in summary and "![ratios](ratios.png)" in summary
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_refuses_unknown_names_and_knows_the_cuda_variants(tmp_path: Path) -> None:
    done = run_command([PYTHON, str(RUN), "--only", "nope", "--results", str(tmp_path / "R.md")])
    assert done.returncode != 0 and "--only: unknown ['nope']" in done.stderr and "checkpoint" in done.stderr
    runner = load_benchmark("run")
    suite = runner.scripts()
    assert {"startup", "memory", "checkpoint", "fsdp_memory", "zero_memory"} <= suite.keys()
    assert "run" not in suite and not any(name.startswith("_") for name in suite)
    assert runner.devices(suite["checkpoint"]) == ("cpu", "cuda")
    assert runner.devices(suite["fsdp_memory"]) == ("cpu",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_section_needs_a_gpu(tmp_path: Path) -> None:
    done = run_command([PYTHON, str(RUN), "--device", "cuda", "--results", str(tmp_path / "R.md")])
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    assert not (tmp_path / "R.md").exists()


def test_the_medians_interval() -> None:
    common = load_benchmark("_common")
    ratios = [1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09, 1.10]
    low, high = common.median_interval(ratios)
    assert low < 1.05 < high and 1.00 <= low and high <= 1.10  # around the median, inside the data
    assert common.median_interval(ratios) == [low, high]  # the same ratios, the same interval
    assert common.median_interval([1.0] * 7) == [1.0, 1.0]
    wider = common.median_interval([1.00, 0.70, 1.02, 1.30, 1.04, 0.80, 1.06, 1.20, 1.08, 0.90, 1.10])
    assert wider[0] < low and wider[1] > high  # noisier ratios, a wider interval
    assert common.median_interval(ratios[:4]) is None  # too few repetitions to say more than the spread
    row = common.median_row("case", ratios, 1.06)
    assert row["ratio"] == 1.05 and (row["low"], row["high"]) == (1.0, 1.1) and row["interval"] == [low, high]
    assert common.interval_text(row) == f"{low:.3f}-{high:.3f} (undecided)"
    assert common.interval_text({**row, "budget": 1.2}) == f"{low:.3f}-{high:.3f}"
    assert common.interval_text({**row, "interval": None}) == "-"
