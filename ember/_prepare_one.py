"""🤗 Accelerate's one-object forms of :meth:`~ember.Accelerator.prepare`: ``prepare_model``,
``prepare_optimizer`` and ``prepare_scheduler`` (defined here, mixed into the Accelerator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember._validation import check_bool
from ember._wrappers import PreparedOptimizer, PreparedScheduler

__all__ = ["PrepareOneMixin"]


class PrepareOneMixin:
    """Each method checks its object's type, then calls ``prepare`` with it alone."""

    if TYPE_CHECKING:

        def prepare(self, *objects: Any, device_placement: Sequence[bool] | None = None) -> Any: ...

    def prepare_model(self, model: nn.Module, device_placement: bool | None = None) -> nn.Module:
        """``prepare(model)`` for one model (🤗 Accelerate's name)."""
        prepared: nn.Module = self._prepare_one(model, nn.Module, "prepare_model", device_placement)
        return prepared

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> PreparedOptimizer:
        """``prepare(optimizer)`` for one optimizer (its model prepared first, as with ``prepare``)."""
        prepared: PreparedOptimizer = self._prepare_one(optimizer, torch.optim.Optimizer, "prepare_optimizer")
        return prepared

    def prepare_scheduler(self, scheduler: Any) -> PreparedScheduler:
        """``prepare(scheduler)`` for one LR scheduler (its optimizer prepared first)."""
        prepared: PreparedScheduler = self._prepare_one(
            scheduler, torch.optim.lr_scheduler.LRScheduler, "prepare_scheduler"
        )
        return prepared

    def _prepare_one(self, obj: Any, kind: type, name: str, device_placement: bool | None = None) -> Any:
        if not isinstance(obj, kind):
            raise TypeError(
                f"{name}() needs a {kind.__module__}.{kind.__qualname__}, got {type(obj).__name__}"
            )
        check_bool("device_placement", device_placement, owner=name, optional=True)
        return self.prepare(obj, device_placement=None if device_placement is None else [device_placement])
