"""🤗 Accelerate's one-object forms of :meth:`~ember.Accelerator.prepare`: ``prepare_model``,
``prepare_optimizer`` and ``prepare_scheduler`` (defined here, mixed into the Accelerator), and
``prepare_model(..., evaluation_mode=True)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember._validation import check_bool
from ember._wrappers import PreparedOptimizer, PreparedScheduler, patch_forward
from ember.empty_weights import check_materialized

if TYPE_CHECKING:
    from ember._plugin_args import PluginChoice
    from ember.precision import Precision

__all__ = ["PrepareOneMixin"]


class PrepareOneMixin:
    """Each method checks its object's type, then calls ``prepare`` with it alone."""

    _plugins: PluginChoice
    device_placement: bool
    if TYPE_CHECKING:

        def prepare(self, *objects: Any, device_placement: Sequence[bool] | None = None) -> Any: ...

        @property
        def precision(self) -> Precision: ...

        @property
        def device(self) -> torch.device: ...

    def prepare_model(
        self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> nn.Module:
        """``prepare(model)`` for one model (🤗 Accelerate's name).

        ``evaluation_mode=True`` (for a model you only evaluate): the precision's conversion and
        forward, the device and ``torch.compile`` as ``prepare`` gives them, but the strategy does not
        wrap the model (no DDP, no sharding: every process holds all of it), as in Accelerate; such
        a model is not one of the prepared models that ``save_state`` saves.
        """
        check_bool("evaluation_mode", evaluation_mode, owner="prepare_model")
        if evaluation_mode:
            return self._prepare_for_evaluation(model, device_placement)
        prepared: nn.Module = self._prepare_one(model, nn.Module, "prepare_model", device_placement)
        return prepared

    def prepare_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None
    ) -> PreparedOptimizer:
        """``prepare(optimizer)`` for one optimizer (its model prepared first, as with ``prepare``).
        ``device_placement`` is accepted for 🤗 Accelerate's signature: the optimizer's state follows
        its parameters, wherever the model was placed."""
        prepared: PreparedOptimizer = self._prepare_one(
            optimizer, torch.optim.Optimizer, "prepare_optimizer", device_placement
        )
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

    def _prepare_for_evaluation(self, model: nn.Module, device_placement: bool | None) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"prepare_model() needs a torch.nn.Module, got {type(model).__name__}")
        check_bool("device_placement", device_placement, owner="prepare_model", optional=True)
        check_materialized(model)
        model = self.precision.convert_module(model)
        if self.device_placement if device_placement is None else device_placement:
            model = model.to(self.device)
        patch_forward(model, self.precision)
        compile_kwargs = self._plugins.compile_kwargs
        if compile_kwargs is None:
            return model
        compiled: nn.Module = torch.compile(model, **compile_kwargs)  # type: ignore[assignment]
        return compiled
