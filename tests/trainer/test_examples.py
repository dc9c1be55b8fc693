"""The Trainer examples run as users run them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dist_helpers import PYTHON, REPO, run_command
from safetensors.torch import load_file

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


def test_cli_example_fits_from_its_config_then_tests_the_checkpoint(tmp_path: Path) -> None:
    example, config = str(REPO / "examples" / "cli.py"), str(REPO / "examples" / "cli.yaml")
    root = tmp_path / "cli"
    fit = run_command([PYTHON, example, "fit", "--config", config, "--trainer.max_epochs", "3",
                       "--trainer.default_root_dir", str(root)], timeout=180)  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    saved = (root / "logs" / "version_0" / "config.yaml").read_text()
    assert "max_epochs: 3" in saved and "class_path: torch.optim.AdamW" in saved
    assert sorted(p.name for p in (root / "checkpoints").iterdir())[-1] == "last"
    test = run_command([PYTHON, example, "test", "--config", config, "--trainer.default_root_dir", str(root),
                        "--ckpt_path", str(root / "checkpoints" / "last")], timeout=180)  # fmt: skip
    assert test.returncode == 0, test.stderr
    rows = list(csv.DictReader(open(root / "logs" / "version_1" / "metrics.csv")))
    assert float(rows[0]["test_acc"]) > 0.7  # 3 epochs on digits


def test_custom_callback_example(tmp_path: Path) -> None:
    result = run_command([PYTHON, str(REPO / "examples" / "custom_callback.py")], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "epochs seen: 5" in result.stdout and "last grad_norm" in result.stdout


def test_manual_optimization_gan_example(tmp_path: Path) -> None:
    example = str(REPO / "examples" / "manual_optimization.py")
    result = run_command([PYTHON, example, "--epochs", "30"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "optimizer steps: 960" in result.stdout  # 30 epochs x 16 batches x 2 optimizers
    distance = float(result.stdout.split("distance to the real mean:")[1].split()[0])
    assert distance < 0.5  # the generator learned where the real points are (it starts near 0)
    assert (tmp_path / "runs" / "gan" / "logs" / "version_0" / "metrics.csv").exists()


def test_gpt_example_sharded_with_fsdp_then_consolidated(tmp_path: Path) -> None:
    root = tmp_path / "gpt"
    quick = ["--max-steps", "12", "--chars", "30000", "--layers", "2", "--width", "32", "--sample", "20",
             "--root", str(root)]  # fmt: skip
    result = run_command([EMBER, "launch", "--nproc-per-node", "2", str(REPO / "examples" / "gpt_fsdp.py"),
                          "--strategy", "fsdp", *quick], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--- sample after 12 steps ---\ndef " in result.stdout
    rows = list(csv.DictReader(open(root / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert losses[-1] < losses[0]  # it learns
    assert any(r.get("val_loss") for r in rows)
    assert (root / "checkpoints" / "last" / "model.shards").is_dir()  # sharded by default
    out = tmp_path / "gpt.safetensors"
    consolidated = run_command([EMBER, "consolidate", str(root / "checkpoints" / "last"), str(out)])
    assert consolidated.returncode == 0, consolidated.stderr
    assert "blocks.1.mlp.2.weight" in load_file(str(out))


def test_gpt_example_with_deepspeed_from_ember_launch_and_plain_python(tmp_path: Path) -> None:
    quick = ["--max-steps", "6", "--chars", "20000", "--layers", "2", "--width", "32", "--sample", "10"]
    launched = run_command([EMBER, "launch", "--nproc-per-node", "2", "--strategy", "deepspeed",
                            str(REPO / "examples" / "gpt_fsdp.py"), *quick, "--root", str(tmp_path / "a")],
                           timeout=600)  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    manifest = json.loads((tmp_path / "a" / "checkpoints" / "last" / "manifest.json").read_text())
    assert manifest["strategy"] == "deepspeed" and manifest["layout"] == "deepspeed"
    plain = run_command([PYTHON, str(REPO / "examples" / "gpt_fsdp.py"), "--devices", "2", "--strategy",
                         "deepspeed_stage_3", *quick, "--root", str(tmp_path / "b")], timeout=600)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert "--- sample after 6 steps ---" in plain.stdout
