"""The Trainer examples run as users run them."""

from __future__ import annotations

import csv
from pathlib import Path

from dist_helpers import PYTHON, REPO, run_command

EMBER = str(Path(PYTHON).parent / "ember")


def test_digits_example_on_two_processes(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    result = run_command([EMBER, "launch", "--nproc-per-node", "2", str(REPO / "examples" / "digits.py"),
                          "--epochs", "3", "--root", str(root)], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test accuracy of the best checkpoint" in result.stdout
    accuracy = float(result.stdout.split("test accuracy of the best checkpoint: ")[1].split()[0])
    assert accuracy > 0.7  # 3 epochs on digits
    rows = list(csv.DictReader(open(root / "logs" / "version_0" / "metrics.csv")))
    assert {"train_loss_step", "val_acc", "val_loss", "lr-AdamW", "test_acc"} <= set(rows[0])
    kept = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "last" in kept and len(kept) == 3  # top-2 by val_acc + last


def test_custom_callback_example(tmp_path: Path) -> None:
    result = run_command([PYTHON, str(REPO / "examples" / "custom_callback.py")], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "epochs seen: 5" in result.stdout and "last grad_norm" in result.stdout
