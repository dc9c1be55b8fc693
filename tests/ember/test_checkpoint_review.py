"""Accelerator checkpoint corners compared with 🤗 Accelerate 1.15: automatic naming with total_limit."""

from __future__ import annotations

from pathlib import Path

import torch

from ember import Accelerator, ProjectConfiguration


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_total_limit_never_deletes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    def accelerator(iteration: int) -> Accelerator:
        config = ProjectConfiguration(
            project_dir=tmp_path, automatic_checkpoint_naming=True, total_limit=2, iteration=iteration
        )
        made = Accelerator(project_config=config)
        made.prepare(torch.nn.Linear(2, 2))
        return made

    first = accelerator(5)
    for _ in range(3):
        first.save_state()
    assert _names(tmp_path / "checkpoints") == ["checkpoint_6", "checkpoint_7"]
    # A new run that numbers from 0 (no load_state): its save is kept, the oldest other one goes,
    # as in Accelerate (which deletes before it saves).
    path = accelerator(0).save_state()
    assert path == tmp_path / "checkpoints" / "checkpoint_0"
    assert _names(tmp_path / "checkpoints") == ["checkpoint_0", "checkpoint_7"]
