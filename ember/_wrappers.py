"""What ``Accelerator.prepare`` wraps around optimizers, schedulers and model forwards."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ember.data import LoopState
from ember.precision import Precision
from ember.strategies import Strategy
from ember.strategies.capabilities import OwnsOptimizerStep


@dataclass(slots=True)
class GradientState:
    """Gradient-accumulation bookkeeping shared by one Accelerator and the objects it prepared."""

    accumulation_steps: int = 1
    sync_with_dataloader: bool = True  # the end of a dataloader pass is a step boundary
    sync_each_batch: bool = False  # micro-steps synchronise gradients too (no no_sync)
    sync_gradients: bool = True
    micro_step: int = 0
    loop: LoopState = field(default_factory=LoopState)


class PreparedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepped through the strategy/precision and skipped while accumulating.

    It subclasses :class:`torch.optim.Optimizer` so LR schedulers accept it, but holds no state
    of its own: ``param_groups``, ``state`` and everything else belong to the wrapped optimizer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: Strategy,
        gradient_state: GradientState,
        siblings: list[PreparedOptimizer] | None = None,
    ) -> None:
        # No super().__init__(): this object only forwards to ``optimizer``.
        self.optimizer = optimizer
        # Every optimizer its Accelerator prepared (this one too): once each stepped, the iteration
        # ends (a grad scaler updates its scale once, after all of them).
        self._siblings = siblings if siblings is not None else [self]
        self._strategy = strategy
        self._gradient_state = gradient_state
        self._owns_step = isinstance(strategy, OwnsOptimizerStep)  # asked once, not every step
        self._direct_step = strategy.direct_optimizer_step
        self._ends_iteration = strategy.precision.ends_iterations  # (a grad scaler: asked once too)
        #: True when the last step() call did not update parameters (accumulating, or inf/NaN grads)
        self.step_was_skipped = False
        # (before, after) pairs run around each step() call that is no accumulation micro-step
        # (_add_step_hooks): the Trainer's count of manual-optimisation steps, Lightning's.
        # (An OrderedDict: the handles hold it by weak reference, which a plain dict refuses.)
        self._step_hooks: OrderedDict[int, tuple[Callable[[], None], Callable[[], None]]] = OrderedDict()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._owns_step:  # the engine clears its own gradient buffers
            return
        if self._gradient_state.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step, through the strategy and precision; returns what ``closure`` returned (the loss).

        Where they act between the backward pass and the step (unscaling, averaging, an engine's
        own step), the closure runs first, once; an optimizer that re-evaluates it (LBFGS) gets it
        passed on, where the strategy and precision support that. As ``torch.optim``'s, the step
        runs whatever the closure returns, except for a :class:`LossClosure` that returns None."""
        if not self._gradient_state.sync_gradients:
            self.step_was_skipped = True
            return None
        if not self._step_hooks:
            return self._step(closure)
        hooks = list(self._step_hooks.values())
        closure = _followed_by([before for before, _ in hooks], closure)
        if closure is None:
            for before, _ in hooks:
                before()
        loss = self._step(closure)
        for _, after in hooks:  # (also when the precision skipped the step: it was one, as Lightning counts)
            after()
        return loss

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        if self._direct_step:  # neither strategy nor precision adds anything to optimizer.step()
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self.step_was_skipped = False
            return loss
        loss = None
        if closure is not None and not isinstance(self.optimizer, torch.optim.LBFGS):
            with torch.enable_grad():
                loss = closure()
            if loss is None and isinstance(closure, LossClosure):  # nothing was backpropagated: no step
                self.step_was_skipped = True
                return None
            closure = None
        self.step_was_skipped = not self._strategy.optimizer_step(self.optimizer, closure)
        if self._ends_iteration:
            self._strategy.precision.end_iteration([o.optimizer for o in self._siblings])
        return loss

    def _add_step_hooks(self, before: Callable[[], None], after: Callable[[], None]) -> RemovableHandle:
        """Run ``before`` ahead of each step (after each call of its closure, where it has one: its
        backward pass) and ``after`` once it is done or skipped by the precision; accumulation
        micro-steps run neither. ``handle.remove()`` takes them off."""
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = (before, after)
        return handle

    def boundary_calls(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        """``(step, zero_grad)`` for a loop that steps only at step boundaries (gradients in sync)
        and zeroes once a window: the wrapped optimizer's own where this wrapper adds nothing there,
        a call less each."""
        if self._direct_step and not self._owns_step:
            self.step_was_skipped = False  # (what step() would set on each call)
            return self.optimizer.step, self.optimizer.zero_grad
        return self.step, self._zero_grad_now

    def _zero_grad_now(self) -> None:
        """``zero_grad`` wherever the loop is (the first batch of a window too: a loop that calls it
        once a window, as the Trainer does, not on every batch as hand-written loops do)."""
        if not self._owns_step:  # (the engine clears its own gradient buffers)
            self.optimizer.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:  # hooks and extras of the wrapped optimizer
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"PreparedOptimizer({self.optimizer!r})"


class LossClosure:
    """A step closure whose ``None`` result means that no backward pass ran, so that
    :meth:`PreparedOptimizer.step` skips the step (the Trainer's closure in automatic optimisation,
    when ``training_step`` returned None, as Lightning skips it). The result of any other closure
    does not decide: its backward pass may have run."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run

    def __call__(self) -> Any:
        return self.run()


def _followed_by(
    calls: list[Callable[[], None]], closure: Callable[[], Any] | None
) -> Callable[[], Any] | None:
    """``closure`` that runs ``calls`` after each of its own calls (None stays None); a
    :class:`LossClosure` stays one."""
    if closure is None:
        return None
    inner = closure

    def run() -> Any:
        result = inner()
        for call in calls:
            call()
        return result

    return LossClosure(run) if isinstance(closure, LossClosure) else run


class PreparedScheduler:
    """Steps the user's LR scheduler only after its optimizer really stepped.

    As in 🤗 Accelerate, one call advances the schedule ``steps_per_call`` (= number of processes)
    times: schedules are usually sized with ``len(dataloader)`` *before* ``prepare`` shards it, and
    each real step consumes ``num_processes`` of those batches.

    ``with_optimizer=False`` (``Accelerator(step_scheduler_with_optimizer=False)``): each call steps
    the schedule once, whatever the optimizer and the accumulation did (schedules sized per call).
    """

    def __init__(
        self,
        scheduler: Any,
        optimizers: list[PreparedOptimizer],
        gradient_state: GradientState,
        steps_per_call: int = 1,
        with_optimizer: bool = True,
    ) -> None:
        self.scheduler = scheduler
        self.steps_per_call = steps_per_call
        self.with_optimizer = with_optimizer
        self._gradient_state = gradient_state
        inner = getattr(scheduler, "optimizer", None)
        self._optimizers = [o for o in optimizers if o.optimizer is inner] or optimizers

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.with_optimizer:
            self.scheduler.step(*args, **kwargs)
            return
        if not self._gradient_state.sync_gradients:
            return
        if any(o.step_was_skipped for o in self._optimizers):
            return
        total = getattr(self.scheduler, "total_steps", None)  # OneCycleLR raises past its end
        for _ in range(self.steps_per_call):
            if total is not None and self.scheduler.last_epoch >= total:
                break
            self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # get_last_lr(), last_epoch, ...
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class _PrecisionForward:
    """The forward :func:`patch_forward` puts on a module (input cast, forward context, output cast).

    An object, not a closure: ``copy.deepcopy(model)`` (an EMA or teacher copy) gets a forward that
    runs the *copy*, and ``torch.save(model)`` pickles the module without the patch, as 🤗 Accelerate's
    prepared models do (a later ``prepare`` patches the loaded module again).
    """

    def __init__(self, original: Callable[..., Any], precision: Precision) -> None:
        self.original = original
        self.precision = precision
        functools.update_wrapper(self, original)  # name, docstring, signature (__wrapped__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        precision = self.precision
        args, kwargs = precision.convert_input((args, kwargs))
        with precision.forward_context():
            output = self.original(*args, **kwargs)
        return precision.convert_output(output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _PrecisionForward:
        # The original is the module's bound method: deep-copied, it is bound to the copy. The
        # plugin is shared: one run has one.
        return _PrecisionForward(copy.deepcopy(self.original, memo), self.precision)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpatched, (self.original,)


def _unpatched(original: Callable[..., Any]) -> Callable[..., Any]:
    return original


def patch_forward(module: nn.Module, precision: Precision) -> None:
    """Route ``module``'s forward through the precision plugin (input cast, autocast, output cast)."""
    if not precision.wraps_forward or isinstance(module.__dict__.get("forward"), _PrecisionForward):
        return
    module.forward = _PrecisionForward(module.forward, precision)  # type: ignore[method-assign]


def unpatch_forward(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), _PrecisionForward):  # (it holds the original)
        del module.forward
