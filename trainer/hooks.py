"""The hook contract: :func:`call_hook` dispatches every hook.

Each hook runs on the callbacks, then on the module, then on the *monitoring* callbacks
(``ModelCheckpoint``, ``EarlyStopping``), which thus see everything the module logged in it.
The order of the hooks is written down once, in ``docs/concepts/hooks.md``;
``tests/trainer/test_hook_order.py`` locks it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.callbacks.base import Callback
from ember.trainer.profilers.timed import callback_action, module_action, strategy_action, timed

if TYPE_CHECKING:
    from torch import nn

    from ember.accelerator import Accelerator
    from ember.trainer.logging import MetricStore
    from ember.trainer.module import TrainModule
    from ember.trainer.profilers import Profiler
    from ember.trainer.trainer import Trainer

__all__ = [
    "HookPlan",
    "call_hook",
    "overridden",
    "run_hook",
    "run_step",
    "step_call",
    "step_method",
]


# What one hook runs: the callbacks' bound hooks, the module's (or None), the monitoring callbacks'
# hooks, and all of them in that order. ``None`` in place of the whole: nothing defines the hook.
Calls = tuple[Callable[..., Any], ...]
Entry = tuple[Calls, Callable[..., Any] | None, Calls, Calls]


class HookPlan:
    """Per hook name, what :func:`call_hook` runs: bound callables, resolved once per stage.

    A callback that inherits :class:`Callback`'s do-nothing hook is left out (and so is a hook its
    :meth:`~Callback.inactive_hooks` names), and so is the module's do-nothing default: with five hooks per training batch, looking up and calling every empty hook
    would cost more than the few hooks that do something. The plan is rebuilt when the Trainer's
    callback list or module changes (a new stage, a callback appended).
    """

    __slots__ = ("_callbacks", "_count", "_entries", "_module")

    def __init__(self) -> None:
        self._callbacks: list[Callback] | None = None
        self._count = 0
        self._module: TrainModule | None = None
        self._entries: _Entries | None = None

    def refresh(self) -> None:
        """Resolve every hook again when next asked (callbacks' :meth:`~Callback.inactive_hooks`
        may have changed: the Trainer refreshes at each stage and training epoch start)."""
        self._entries = None

    def entries(self, trainer: Trainer) -> _Entries:
        """Hook name -> :data:`Entry` (or None), for the trainer's current callbacks and module."""
        callbacks, module = trainer.callbacks, trainer._module
        if (
            self._entries is None
            or callbacks is not self._callbacks
            or len(callbacks) != self._count
            or module is not self._module
        ):
            if module is None:
                module = trainer.module  # raises: no module attached yet
            self._callbacks, self._count, self._module = callbacks, len(callbacks), module
            self._entries = _Entries(trainer, callbacks, module)
        return self._entries


class _Entries(dict[str, "Entry | None"]):
    """Binds a hook the first time it is asked for."""

    def __init__(self, trainer: Trainer, callbacks: list[Callback], module: TrainModule) -> None:
        super().__init__()
        self._trainer, self._callbacks, self._module = trainer, list(callbacks), module
        self._inactive = [c.inactive_hooks(trainer) for c in self._callbacks]

    def __missing__(self, name: str) -> Entry | None:
        from ember.trainer.module import TrainModule  # here: the module imports this one

        trainer, module = self._trainer, self._module
        default = getattr(Callback, name, None)
        defining = [
            c
            for c, inactive in zip(self._callbacks, self._inactive, strict=True)
            if (default is None or _func(getattr(c, name)) is not default) and name not in inactive
        ]
        module_default = getattr(TrainModule, name, None)
        # The module's do-nothing default is not called; a hook set on the instance itself is.
        overridden = (
            module_default is None
            or getattr(type(module), name, None) is not module_default
            or name in module.__dict__
        )
        profiler = trainer.config.profiler  # None: the bound hooks themselves, nothing around them
        first = tuple(_bind(profiler, c, name, trainer, module) for c in defining if not c.monitoring)
        monitoring = tuple(_bind(profiler, c, name, trainer, module) for c in defining if c.monitoring)
        own = getattr(module, name, None) if overridden else None  # some hooks are callbacks' only
        if own is not None and profiler is not None:
            own = timed(profiler, module_action(module, name), own)
        every = first + ((own,) if own is not None else ()) + monitoring
        entry = (first, own, monitoring, every) if every else None
        self[name] = entry
        return entry


def _bind(
    profiler: Profiler | None, callback: Callback, name: str, trainer: Trainer, module: TrainModule
) -> Any:
    """``callback.<name>`` with the trainer and module bound, timed under a profiler."""
    hook = functools.partial(getattr(callback, name), trainer, module)
    return hook if profiler is None else timed(profiler, callback_action(callback, name), hook)


def _func(method: Any) -> Any:
    return getattr(method, "__func__", method)


def run_hook(store: MetricStore, name: str, entry: Entry, *args: Any) -> Any:
    """Run the parts of a resolved hook; returns what the module's hook returned. ``self.log``
    inside the hook files its values under ``name`` (``store.fx``). (Inside a training batch,
    the loops call the parts of a per-batch hook themselves, under the batch's one name.)"""
    first, own, monitoring, _ = entry
    previous, store.fx = store.fx, name
    try:
        for hook in first:
            hook(*args)
        result = own(*args) if own is not None else None
        for hook in monitoring:
            hook(*args)
        return result
    finally:
        store.fx = previous


def call_hook(trainer: Trainer, name: str, *args: Any, part: str = "all", module_hook: bool = True) -> Any:
    """Call hook ``name`` on the callbacks and the module, in the documented order.

    ``part="first"`` stops before the monitoring callbacks and ``part="monitoring"`` calls only
    them: the loop does its own work in between (docs/concepts/hooks.md). Returns what the
    module's hook returned.
    """
    entry = trainer._hook_plan.entries(trainer)[name]
    if entry is None:
        return None
    first, own, monitoring, every = entry
    if part == "first":
        monitoring = ()
    elif part == "monitoring":
        first, own = (), None
    if not module_hook:
        own = None
    return run_hook(trainer._metrics, name, (first, own, monitoring, every), *args)


def step_call(trainer: Trainer, name: str, loaders: int = 1) -> Callable[..., Any]:
    """:func:`step_method` of the trainer's module, timed as ``[Strategy]{class}.{name}`` under a
    profiler: a loop asks once, before its batches."""
    method = step_method(trainer.module, name, loaders)
    return timed(trainer.config.profiler, strategy_action(trainer, name), method)


def step_method(module: TrainModule, name: str, loaders: int = 1) -> Callable[..., Any]:
    """The module's bound ``name`` (a ``*_step``), taking the loop's ``(batch, batch_idx[,
    dataloader_idx])``; Lightning also allows ``training_step(self, batch)``: such a method gets
    the batch alone. With several ``loaders`` it must take ``dataloader_idx`` (a RuntimeError
    before the first batch, as Lightning's)."""
    method: Callable[..., Any] = getattr(module, name)
    function = getattr(method, "__func__", method)
    if function not in _positional_counts:
        _positional_counts[function] = _positional_count(method)
    count = _positional_counts[function]
    if loaders > 1 and 0 <= count < 3:
        kind = name.removesuffix("_step").replace("validation", "val")
        raise RuntimeError(
            f"there are {loaders} {kind} dataloaders, but {type(module).__name__}.{name}() takes no "
            f"dataloader_idx argument: add it, {name}(self, batch, batch_idx, dataloader_idx=0)"
        )
    if count != 1:
        return method

    def batch_only(batch: Any, batch_idx: int) -> Any:
        return method(batch)

    return batch_only


_positional_counts: dict[Any, int] = {}  # a step function -> how many positional arguments it takes


def _positional_count(method: Callable[..., Any]) -> int:
    """How many positional arguments ``method`` takes (-1: any number, or its signature is unknown)."""
    try:
        kinds = [p.kind for p in inspect.signature(method).parameters.values()]
    except (TypeError, ValueError):
        return -1
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return -1
    return sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds
    )


def run_step(
    store: MetricStore, accelerator: Accelerator, model: nn.Module, name: str, method: Any, *args: Any
) -> Any:
    """Run ``method`` (``module.<name>``, from :func:`step_call`) through the strategy and precision
    (``Accelerator.call_as_forward``); the loops look the model and the method up once."""
    previous, store.fx = store.fx, name
    try:
        return accelerator.call_as_forward(model, method, *args)
    finally:
        store.fx = previous


def overridden(module: TrainModule, name: str) -> Callable[..., Any] | None:
    """The module's ``name`` when it is not :class:`TrainModule`'s own (a subclass or the instance
    overrides it: Lightning's step and batch-transfer hooks), else None: the Trainer runs its own
    code for it, a call less."""
    from ember.trainer.module import TrainModule  # here: the module imports this one

    method: Callable[..., Any] = getattr(module, name)
    return None if getattr(method, "__func__", None) is getattr(TrainModule, name) else method
