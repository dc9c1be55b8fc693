"""What a logged value is: a torchmetrics ``Metric`` or a scalar, the batch size that weights it,
the names Lightning gives its step and epoch values, and the entry ``MetricStore`` keeps per name."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["as_scalar", "forked_name", "infer_batch_size", "is_metric"]


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a torchmetrics ``Metric``. Code that made one has imported torchmetrics;
    importing it here for the check would add ~1.5 s to ``import ember``."""
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(value, torchmetrics.Metric)


def infer_batch_size(batch: Any) -> int:
    """Size of the first dimension of the first tensor found in ``batch`` (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        values: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    else:
        return 1
    for value in values:
        if isinstance(value, (torch.Tensor, dict, list, tuple)):
            return infer_batch_size(value)
    return 1


def forked_name(key: str, suffix: str) -> str:
    """``key`` with ``_step`` / ``_epoch`` before its loader suffix, as Lightning names it:
    ``loss_step/dataloader_idx_0``."""
    name, loader, idx = key.partition("/dataloader_idx_")
    return f"{name}{suffix}{loader}{idx}"


def as_scalar(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:  # the usual case: a loss or a metric already is a scalar (no reshape op)
            return value.detach()
        if value.numel() != 1:
            raise ValueError(f"log({name!r}) needs a scalar; got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(
        f"log({name!r}) accepts a number, a scalar tensor or a torchmetrics Metric; got {type(value).__name__}"
    )


@dataclasses.dataclass(slots=True)
class _Entry:
    """One logged name's options and running epoch aggregate (``MetricStore``)."""

    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    sync_dist: bool
    reduce_fx: str
    metric: Metric | None = None
    group: Any = None  # sync_dist_group: the process group sync_dist reduces within (None: all)
    total: torch.Tensor | None = None  # running sum of value x batch size (mean), or running sum/max/min
    weight: float = 0.0  # sum of batch sizes
    computed: torch.Tensor | None = None  # a metric's value at the end of its loader (end_loader)
