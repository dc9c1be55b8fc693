"""Lightning's public helpers of ``ModelCheckpoint`` that ported callbacks and scripts call:
``file_exists``, ``check_monitor_top_k`` and ``to_yaml`` (mixed into the callback)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["LightningCheckpointHelpers"]


class LightningCheckpointHelpers:
    """What Lightning's ``ModelCheckpoint`` offers beside its hooks, with the same answers."""

    best_k_models: dict[str, torch.Tensor]
    dirpath: str | None
    mode: str
    save_top_k: int

    if TYPE_CHECKING:  # (ModelCheckpoint's)

        @property
        def kth_best_model_path(self) -> str: ...

    def file_exists(self, filepath: str | os.PathLike[str], trainer: Trainer) -> bool:
        """Whether ``filepath`` exists on global rank 0, the same answer on every process."""
        exists = os.path.exists(filepath)
        return bool(trainer.accelerator.broadcast_object(exists) if trainer.world_size > 1 else exists)

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | float | None = None) -> bool:
        """Whether a checkpoint with the monitored value ``current`` would enter the kept top
        ``save_top_k``: strictly better than the k-th best once there are k; on several processes
        only when every process says so (Lightning's ``reduce_boolean_decision``)."""
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        decision = bool(better(torch.as_tensor(current), self.best_k_models[self.kth_best_model_path].cpu()))
        if trainer.world_size > 1:
            votes = trainer.accelerator.reduce(
                torch.tensor(int(decision), device=trainer.accelerator.device), "sum"
            )
            decision = int(votes) == trainer.world_size
        return decision

    def to_yaml(self, filepath: str | os.PathLike[str] | None = None) -> None:
        """Write ``best_k_models`` (path: score) as YAML, by default to ``<dirpath>/best_k_models.yaml``."""
        import yaml

        if filepath is None:
            if self.dirpath is None:
                raise ValueError(
                    "ModelCheckpoint.to_yaml() without filepath writes into dirpath, which is not set yet "
                    "(it is resolved when the fit starts): pass filepath"
                )
            filepath = os.path.join(self.dirpath, "best_k_models.yaml")
        scores: dict[str, Any] = {path: float(score) for path, score in self.best_k_models.items()}
        with open(filepath, "w") as out:
            yaml.safe_dump(scores, out)
