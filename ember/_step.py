"""The Accelerator's step: backward, gradient accumulation, autocast, unscaling and clipping."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember._wrappers import GradientState
from ember.strategies import BackwardSyncControl, Strategy
from ember.strategies.base import OwnsOptimizerStep

if TYPE_CHECKING:
    from ember._checkpoint import PreparedObjects
    from ember.precision import Precision

__all__ = ["StepMixin"]

_NOTHING = nullcontext()  # reusable: it holds no state


class StepMixin:
    """The step of a hand-written loop; mixed into :class:`~ember.Accelerator`."""

    _strategy: Strategy
    _objects: PreparedObjects
    _gradient_state: GradientState
    _direct_backward: bool  # neither strategy nor precision adds to loss.backward() (asked once)
    _owns_step: bool  # the strategy's engine steps inside backward (DeepSpeed)
    _unscales: bool  # the precision plugin has a scaler (16-mixed)

    if TYPE_CHECKING:

        @property
        def precision(self) -> Precision: ...

        @property
        def sync_gradients(self) -> bool: ...

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` through the strategy and precision (scaled by 1/accumulation steps)."""
        if not self._objects.models:
            raise RuntimeError(
                "accelerator.backward() was called before accelerator.prepare(model, ...): prepare the model "
                "first so the strategy and precision plugin can handle its backward pass"
            )
        if self._gradient_state.accumulation_steps > 1:
            loss = loss / self._gradient_state.accumulation_steps
        if self._direct_backward:  # fp32 on one device: nothing to add
            loss.backward(**kwargs)
        elif self._owns_step:  # DeepSpeed: backward and the engine's step
            assert isinstance(self._strategy, OwnsOptimizerStep)
            self._strategy.backward_and_step(loss, boundary=self._gradient_state.sync_gradients, **kwargs)
        else:
            self._strategy.backward(loss, **kwargs)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Skip gradient synchronization for backward passes inside the context (where supported)."""
        if isinstance(self._strategy, BackwardSyncControl):
            return self._strategy.no_backward_sync(model)
        return nullcontext()

    def accumulate(self, *models: nn.Module, sync: bool | None = None) -> AbstractContextManager[None]:
        """Mark one micro-step; gradients are synchronized and applied every N-th step and at epoch end.

        ``sync`` overrides the count for loops that decide themselves (the Trainer does).
        """
        state = self._gradient_state
        if sync is not None:
            state.micro_step = 0 if sync else state.micro_step + 1
            state.sync_gradients = sync
        elif state.loop.end_of_dataloader:
            state.micro_step, state.sync_gradients = 0, True
        else:
            state.micro_step += 1
            state.sync_gradients = state.micro_step % state.accumulation_steps == 0
        if state.sync_gradients:  # nothing to enter: a step boundary costs no context machinery
            return _NOTHING
        return self._no_sync_all(models)

    @contextmanager
    def _no_sync_all(self, models: Sequence[nn.Module]) -> Iterator[None]:
        with ExitStack() as stack:
            for model in models:
                stack.enter_context(self.no_sync(model))
            yield

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision plugin's forward context (autocast for the mixed precisions)."""
        return self.precision.forward_context()

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Bring gradients to their true scale now (``16-mixed``), e.g. to inspect them before a step;
        ``optimizer``: a prepared optimizer or a list of them (default: every one)."""
        if not self._unscales:
            return  # the plugin has no scaler: nothing to do (asked on every step)
        targets: list[Any] = self._inner_optimizers()
        if optimizer is not None and targets:
            chosen = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
            targets = [getattr(o, "optimizer", o) for o in chosen]
        for inner in targets:
            self.precision.unscale_gradients(inner)

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in self._objects.optimizers] if self.sync_gradients else []

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradient norm (gradients are unscaled first under ``16-mixed``); returns the total norm."""
        return self._strategy.clip_gradients_norm(
            _params(parameters), self._inner_optimizers(), max_norm, norm_type
        )

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        self._strategy.clip_gradients_value(_params(parameters), self._inner_optimizers(), clip_value)


def _params(parameters: Any) -> Sequence[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)
