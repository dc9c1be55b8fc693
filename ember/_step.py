"""The Accelerator's step: backward, gradient accumulation, autocast, unscaling and clipping."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember._plugin_args import uncompiled
from ember._validation import check_bool
from ember._wrappers import GradientState, PreparedOptimizer
from ember.strategies import BackwardSyncControl, Strategy
from ember.strategies.capabilities import ForcesBackwardSync, JoinsUnevenInputs, OwnsOptimizerStep

if TYPE_CHECKING:
    from ember._checkpoint import PreparedObjects
    from ember.dataloader_config import DataLoaderConfiguration
    from ember.kwargs_handlers import AutocastKwargs
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
    _dataloader_config: DataLoaderConfiguration

    if TYPE_CHECKING:

        @property
        def precision(self) -> Precision: ...

        @property
        def sync_gradients(self) -> bool: ...

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward(*args, **kwargs)`` through the strategy and precision (scaled by
        1/accumulation steps)."""
        if not self._objects.models:
            raise RuntimeError(
                "accelerator.backward() was called before accelerator.prepare(model, ...): prepare the model "
                "first so the strategy and precision plugin can handle its backward pass"
            )
        if self._gradient_state.accumulation_steps > 1:
            loss = loss / self._gradient_state.accumulation_steps
        if self._direct_backward:  # fp32 on one device: nothing to add
            loss.backward(*args, **kwargs)
        elif self._owns_step:  # DeepSpeed: backward and the engine's step
            assert isinstance(self._strategy, OwnsOptimizerStep)
            if args:
                raise TypeError(
                    f"backward(loss, *{args!r}): the {self._strategy.strategy_name!r} engine takes backward's "
                    "options by keyword only (e.g. retain_graph=True)"
                )
            self._strategy.backward_and_step(loss, boundary=self._gradient_state.sync_gradients, **kwargs)
        else:
            self._strategy.backward(loss, *args, **kwargs)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Skip gradient synchronization for backward passes inside the context (where supported)."""
        if isinstance(self._strategy, BackwardSyncControl):
            return self._strategy.no_backward_sync(uncompiled(model))
        return nullcontext()

    def trigger_sync_in_backward(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Make the next backward through ``model`` synchronize gradients, even inside :meth:`no_sync`
        or after forwards run there (🤗 Accelerate's method): the gradients accumulated so far and
        this backward's are all-reduced together. A null context on one process, and where
        :meth:`no_sync` skips nothing (DeepSpeed); under FSDP and XLA it warns and does nothing.

        Example::

            with accelerator.no_sync(model):
                loss_a, loss_b = loss_fn(model(input_a)), loss_fn(model(input_b))
            accelerator.backward(loss_a)  # accumulates, no all-reduce
            with accelerator.trigger_sync_in_backward(model):
                accelerator.backward(loss_b)  # all-reduces the sum of both
        """
        strategy = self._strategy
        if strategy.world_size == 1:
            return _NOTHING
        if isinstance(strategy, ForcesBackwardSync):
            return strategy.force_backward_sync(uncompiled(model))
        if isinstance(strategy, BackwardSyncControl):
            warnings.warn(
                f"trigger_sync_in_backward() has no effect under strategy {strategy.strategy_name!r}: a backward "
                "inside no_sync(model) does not synchronize gradients there; run it outside no_sync",
                stacklevel=2,
            )
        return _NOTHING

    @contextmanager
    def join_uneven_inputs(
        self, joinables: Sequence[Any], even_batches: bool | None = None
    ) -> Iterator[None]:
        """Let processes with different numbers of batches train together in the block (🤗 Accelerate's
        method): under DDP with several processes, the block runs inside
        ``torch.distributed.algorithms.Join(joinables)``, enabled when batches are uneven. A process
        that runs out of batches then shadows the others' gradient all-reduces until they are done,
        and at the end every replica takes the parameters of the last process to finish.

        ``joinables``: the prepared (DDP) models, and any other ``Joinable`` (a prepared
        ``ZeroRedundancyOptimizer``). ``even_batches`` (not ``None``) overrides the Accelerator's
        for every prepared dataloader inside the block, and is put back after it. On one process it
        does nothing; under other strategies (FSDP, DeepSpeed, XLA) it warns and does nothing.

        Example::

            with accelerator.join_uneven_inputs([model], even_batches=False):
                for x, y in loader:  # rank 0 may run one batch more than rank 1
                    accelerator.backward(loss_fn(model(x), y))
                    optimizer.step(); optimizer.zero_grad()
        """
        if not isinstance(joinables, (list, tuple)) or not joinables:
            kind = type(joinables).__name__
            raise TypeError(
                "join_uneven_inputs(joinables) takes a non-empty list of prepared models (and other Joinable "
                f"objects), got {'an empty ' + kind if isinstance(joinables, (list, tuple)) else 'a ' + kind}"
            )
        check_bool("even_batches", even_batches, owner="join_uneven_inputs", optional=True)
        strategy = self._strategy
        if strategy.world_size == 1:
            yield
            return
        if not isinstance(strategy, JoinsUnevenInputs):
            warnings.warn(
                f"join_uneven_inputs() has no effect under strategy {strategy.strategy_name!r}: joining processes "
                "with uneven inputs needs DDP; even_batches is left as it is",
                stacklevel=3,
            )
            yield
            return
        loaders = list(self._objects.dataloaders)
        before = [loader.even_batches for loader in loaders]
        even = self._dataloader_config.even_batches if even_batches is None else even_batches
        try:
            for loader in loaders:  # read when a pass starts (and by len())
                loader.even_batches = even
            inner = [j.optimizer if isinstance(j, PreparedOptimizer) else uncompiled(j) for j in joinables]
            # As in Accelerate, Join is entered but disabled while batches are even: every process
            # then runs every step, and nothing needs shadowing.
            with strategy.join(inner, enable=not even):
                yield
        finally:
            for loader, value in zip(loaders, before, strict=True):
                loader.even_batches = value

    def accumulate(self, *models: nn.Module, sync: bool | None = None) -> AbstractContextManager[None]:
        """Mark one micro-step; gradients are synchronized and applied every N-th step and at epoch end.

        ``sync`` overrides the count for loops that decide themselves (the Trainer does).
        """
        state = self._gradient_state
        if sync is not None:
            state.micro_step = 0 if sync else state.micro_step + 1
            state.sync_gradients = sync
        elif state.sync_with_dataloader and state.loop.end_of_dataloader:
            state.micro_step, state.sync_gradients = 0, True
        else:
            state.micro_step += 1
            state.sync_gradients = state.micro_step % state.accumulation_steps == 0
        # sync_each_batch (GradientAccumulationPlugin): all-reduce on micro-steps too, step only at the boundary
        if state.sync_gradients or state.sync_each_batch:  # a step boundary costs no context machinery
            return _NOTHING
        return self._no_sync_all(models)

    @contextmanager
    def _no_sync_all(self, models: Sequence[nn.Module]) -> Iterator[None]:
        with ExitStack() as stack:
            for model in models:
                stack.enter_context(self.no_sync(model))
            yield

    def autocast(self, autocast_handler: AutocastKwargs | None = None) -> AbstractContextManager[Any]:
        """The precision plugin's forward context (autocast for the mixed precisions).

        ``autocast_handler`` (🤗 Accelerate's) sets ``torch.autocast``'s options for this block, e.g.
        ``AutocastKwargs(enabled=False)`` runs it in full precision under ``bf16-mixed``."""
        if autocast_handler is None:
            return self.precision.forward_context()
        from ember.kwargs_handlers import AutocastKwargs  # (loaded when a handler is given)

        if not isinstance(autocast_handler, AutocastKwargs):
            raise TypeError(
                f"autocast(autocast_handler={autocast_handler!r}): expected an ember.AutocastKwargs or None"
            )
        return self.precision.autocast_context(
            enabled=autocast_handler.enabled, cache_enabled=autocast_handler.cache_enabled
        )

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Bring gradients to their true scale now (``16-mixed``), e.g. to inspect them before a step;
        ``optimizer``: a prepared optimizer or a list of them (default: every one)."""
        if not self._unscales:
            return  # the plugin has no scaler: nothing to do (asked on every step)
        chosen = (
            None if optimizer is None else optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
        )
        for inner in self._inner_optimizers(chosen):
            self.precision.unscale_gradients(inner)

    def _inner_optimizers(self, chosen: Sequence[Any] | None = None) -> list[torch.optim.Optimizer]:
        """The optimizers whose gradients a step boundary unscales: ``chosen`` (prepared or not; None:
        every prepared one); none on accumulation micro-steps."""
        if not self.sync_gradients:
            return []
        if chosen is None:
            return [o.optimizer for o in self._objects.optimizers]
        return [getattr(o, "optimizer", o) for o in chosen]

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradient norm (under ``16-mixed``, the gradients of the optimizers holding
        ``parameters`` are unscaled first); returns the total norm."""
        params = _params(parameters)
        return self._clip_norm(params, self._owners(params), max_norm, norm_type)

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        params = _params(parameters)
        self._clip_value(params, self._owners(params), clip_value)

    def _owners(self, params: Sequence[torch.Tensor]) -> list[Any] | None:
        """The prepared optimizers holding any of ``params`` (None: every one). Only theirs are
        unscaled: a GAN's generator, not yet backpropagated, must not be unscaled by the clip of the
        discriminator (🤗 Accelerate unscales every optimizer there)."""
        if not self._unscales or len(self._objects.optimizers) < 2:
            return None
        ids = {id(p) for p in params}
        owners = [
            o
            for o in self._objects.optimizers
            if any(id(p) in ids for g in o.param_groups for p in g["params"])
        ]
        return owners or None

    def _clip_norm(
        self,
        params: Sequence[torch.Tensor],
        optimizers: Sequence[Any] | None,
        max_norm: float,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        """:meth:`clip_grad_norm_`, unscaling the gradients of ``optimizers`` only (None: every
        prepared one), as ``TrainModule.clip_gradients(optimizer)`` needs."""
        scale = self._micro_step_scale()
        if scale is not None:  # scaled gradients, kept scaled: clip them to the scaled bound
            return self._strategy.clip_gradients_norm(params, [], max_norm * scale, norm_type) / scale
        return self._strategy.clip_gradients_norm(
            params, self._inner_optimizers(optimizers), max_norm, norm_type
        )

    def _clip_value(
        self, params: Sequence[torch.Tensor], optimizers: Sequence[Any] | None, clip_value: float
    ) -> None:
        """:meth:`clip_grad_value_`, unscaling the gradients of ``optimizers`` only (None: all)."""
        scale = self._micro_step_scale()
        if scale is not None:
            self._strategy.clip_gradients_value(params, [], clip_value * scale)
            return
        self._strategy.clip_gradients_value(params, self._inner_optimizers(optimizers), clip_value)

    def _micro_step_scale(self) -> float | None:
        """The loss scale on an accumulation micro-step under ``16-mixed`` (None: no scaling here).
        The gradients stay scaled there (the scaler unscales once per step, at the boundary), so
        clipping them to ``bound * scale`` clips the true gradients to ``bound``. DeepSpeed's engine
        scales and clips on its own."""
        if not self._unscales or self._gradient_state.sync_gradients:  # (one read outside 16-mixed)
            return None
        scaler = self.precision.scaler
        if self._owns_step or scaler is None or not scaler.is_enabled():
            return None
        return scaler.get_scale()


def _params(parameters: Any) -> Sequence[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)
