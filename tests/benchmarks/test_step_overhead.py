"""The step-overhead and scaling benchmarks run (tiny settings) and write their sections and ratio
files; frameworks that are not installed are reported as skipped. Timings are reported by the
benchmarks, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dist_helpers import PYTHON, REPO, base_env, load_benchmark, run_command

BENCHMARKS = REPO / "benchmarks"


def _main(module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


def test_step_overhead_without_lightning_or_accelerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for package in ("lightning", "accelerate"):  # as where the bench extra is not installed
        monkeypatch.setitem(sys.modules, package, None)
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    module = load_benchmark("step_overhead")
    _main(module, ["--quick", "--cases", "mlp", "--modes", "single", "--results", str(results),
                   "--ratios", str(ratios)], monkeypatch)  # fmt: skip
    text = results.read_text()
    assert (
        "<!-- step_overhead:start -->" in text
        and "### MLP 128-256-256-10, batch 64, 1 process (CPU time)" in text
    )
    for label in ("Lightning Trainer (defaults)", "Lightning Trainer (barebones=True)", "Lightning Fabric"):
        assert f"- {label}: skipped, `lightning` is not installed" in text
    assert "- Accelerate: skipped, `accelerate` is not installed" in text
    assert "Other frameworks: none installed." in text
    rows = json.loads((ratios / "step_overhead.json").read_text())
    assert [(r["case"], r["budget"]) for r in rows] == [
        ("mlp single accelerator", 1.01),
        ("mlp single trainer", 1.02),
    ]
    assert all(r["low"] <= r["ratio"] <= r["high"] and r["value"] > 0 for r in rows)


@pytest.mark.bench
def test_step_overhead_ddp_on_two_processes(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    cmd = [PYTHON, str(BENCHMARKS / "step_overhead.py"), "--quick", "--cases", "gpt", "--modes", "ddp",
           "--contenders", "hand", "trainer", "--results", str(results), "--ratios", str(ratios)]  # fmt: skip
    done = run_command(cmd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert "DDP on 2 processes (wall-clock time)" in text and "| gpt ddp: ember Trainer (defaults) |" in text
    rows = json.loads((ratios / "step_overhead.json").read_text())
    assert [r["case"] for r in rows] == ["gpt ddp trainer"]


def test_step_overhead_on_cuda_fails_clearly_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA section would run")
    cmd = [
        PYTHON,
        str(BENCHMARKS / "step_overhead.py"),
        "--device",
        "cuda",
        "--results",
        str(tmp_path / "R.md"),
    ]
    done = run_command(cmd, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    assert not (tmp_path / "R.md").exists()


def _measured_in_a_fresh_process(expression: str, tmp_path: Path) -> Any:
    """``expression`` (using ``_contenders``' ``Run`` and ``measure``; ``sys.argv[2]`` is ``tmp_path``)
    evaluated in a new interpreter, its JSON result."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from _contenders import Run, measure; "
        f"print(json.dumps({expression}))"
    )
    done = subprocess.run([PYTHON, "-c", code, str(BENCHMARKS), str(tmp_path)], env=base_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.bench
def test_other_frameworks_train_when_installed(tmp_path: Path) -> None:
    # Lightning and Accelerate are in the bench extra only: where installed, each contender trains.
    pytest.importorskip("lightning")
    pytest.importorskip("accelerate")
    measured = _measured_in_a_fresh_process(
        "{c: measure(c, Run(case='mlp', warmup=1, steps=2, root=sys.argv[2]), paced=True) "
        "for c in ('lightning', 'lightning_barebones', 'fabric', 'accelerate')}",
        tmp_path,
    )
    assert all(m["step_s"] > 0 and m["pace_s"] > 0 for m in measured.values()) and len(measured) == 4


def test_a_paced_run_times_the_contender_without_its_pacer(tmp_path: Path) -> None:
    # The hand-written loop paced by itself: both halves of the window do the same work, so the
    # contender's time (the window less the pacer's steps) is about the pacer's, not twice it.
    measured = _measured_in_a_fresh_process(
        "measure('hand', Run(case='mlp', warmup=5, steps=60, root=sys.argv[2]), paced=True)", tmp_path
    )
    assert 0.6 < measured["cpu_s"] / measured["pace_cpu_s"] < 1.5
    assert 0.6 < measured["step_s"] / measured["pace_s"] < 1.5


def test_scaling_arithmetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # With a linear cost model (us per step: the pacer, i.e. the hand loop, 100; Trainer +10, +2 per
    # logged value, +0.5 per callback; Accelerator +1) the report shows flat growth and those costs.
    module = load_benchmark("scaling")

    def fake(job: str) -> list[float]:  # [the run's us per step, its pacer's]
        contender, _, metrics, callbacks = job.split("#")[0].split(":")  # "#2": another run at 1x steps
        extra = {"accelerator": 1.0, "trainer": 10 + 2 * int(metrics) + 0.5 * int(callbacks)}
        return [100 + extra[contender], 100.0]

    def measured(dimension: str, args: Any) -> dict[str, list[list[float]]]:  # what the worker returns
        rounds = args.reps if dimension == "steps" else args.unit_reps  # (as the worker's)
        return {job: [fake(job)] * rounds for job in module._jobs(dimension, args)}

    monkeypatch.setattr(module, "_measured", measured)
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    argv = ["--reps", "2", "--unit-reps", "3", "--metrics", "5", "--callbacks", "5", "--results", str(results),
            "--ratios", str(ratios)]  # fmt: skip
    _main(module, argv, monkeypatch)
    text = results.read_text()
    # steps: pacer 100, Accelerator +1, Trainer +10 +2 x 1 metric
    assert "| 50 (1x) | 100.0 | 101.0 | 1.010 | 112.0 | 1.120 |" in text
    assert "| 50 (10x) | 210.0 | 100.0 | 2.100 | 2.00 |" in text  # 50 values logged: 10 + 2 x 50
    assert "| 500 (100x) | 362.0 | 100.0 | 3.620 | 0.50 |" in text  # 500 callbacks: 10 + 2 + 0.5 x 500
    rows = json.loads((ratios / "scaling.json").read_text())
    assert len(rows) == 6 and all(r["ratio"] == pytest.approx(1.0) for r in rows)
    assert "(2 of 50 x 1, 10, 100 steps for the steps" in text and "3 of 350 steps for values" in text


def test_scaling_runs(tmp_path: Path) -> None:
    results, ratios = tmp_path / "RESULTS.md", tmp_path / "ratios"
    cmd = [PYTHON, str(BENCHMARKS / "scaling.py"), "--quick", "--dimensions", "callbacks",
           "--results", str(results), "--ratios", str(ratios)]  # fmt: skip
    done = run_command(cmd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "### Callbacks" in results.read_text()
    rows = json.loads((ratios / "scaling.json").read_text())
    assert [r["case"] for r in rows] == ["trainer: us per callback 10x-100x / 1x-10x"]


def test_rivals_run_fewer_rounds_than_ember() -> None:
    import argparse

    rounds = load_benchmark("step_overhead")._rounds
    assert rounds("ember", argparse.Namespace(rounds=10, rival_rounds=5)) == 10
    assert rounds("fabric", argparse.Namespace(rounds=10, rival_rounds=5)) == 5
    assert rounds("lightning", argparse.Namespace(rounds=2, rival_rounds=5)) == 2  # --quick: 2 for everyone
    shares = load_benchmark("step_overhead")._shares
    assert shares("ember", argparse.Namespace(rounds=6, rival_rounds=3, processes=3)) == [2, 2, 2]
    assert shares("ember", argparse.Namespace(rounds=7, rival_rounds=3, processes=3)) == [3, 2, 2]
    assert shares("ember", argparse.Namespace(rounds=2, rival_rounds=3, processes=3)) == [1, 1]
    assert shares("fabric", argparse.Namespace(rounds=6, rival_rounds=3, processes=3)) == [3]  # one process


def test_a_comparison_with_lightning_inside_the_noise_is_tied_not_lost() -> None:
    compare = load_benchmark("step_overhead")._compare
    row = {"ratio": 0.994, "interval": [0.985, 1.013]}
    assert compare("accelerator", row, "fabric", 1.02).endswith(": below.")
    assert ": tied (undecided: 0.990 is inside" in compare("accelerator", row, "fabric", 0.990)
    assert ": tied (undecided: 1.000 is inside" in compare("accelerator", row, "fabric", 1.0)  # ember lower
    assert compare("accelerator", row, "fabric", 0.980).endswith(": **NOT below**.")
    assert compare("accelerator", {**row, "interval": None}, "fabric", 0.990).endswith("**NOT below**.")
    assert compare("accelerator", {**row, "interval": None}, "fabric", 1.0).endswith(": below.")
