"""The hook contract: :func:`call_hook` dispatches every hook.

Each hook runs on the callbacks, then on the module, then on the *monitoring* callbacks
(``ModelCheckpoint``, ``EarlyStopping``), which thus see everything the module logged in it.
The order of the hooks is written down once, in ``docs/concepts/hooks.md``;
``tests/trainer/test_hook_order.py`` locks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["HookPlan", "call_hook"]


class HookPlan:
    """Per hook name, the callbacks that override it, in the order :func:`call_hook` runs them.

    A callback that inherits :class:`Callback`'s do-nothing hook is left out: with five hooks per
    training batch, looking up and calling every callback's empty hooks would cost more than the
    few hooks that do something. The plan is rebuilt when the Trainer's callback list changes.
    """

    __slots__ = ("_by_name", "_callbacks", "_count", "_module_type")

    def __init__(self) -> None:
        self._callbacks: list[Callback] | None = None
        self._count = 0
        self._module_type: type | None = None
        self._by_name: dict[str, tuple[list[Callback], bool, list[Callback]]] = {}

    def plan(
        self, callbacks: list[Callback], module: Any, name: str
    ) -> tuple[list[Callback], bool, list[Callback]]:
        """(callbacks before the module's hook, whether the module's class overrides the hook,
        monitoring callbacks after it), for hook ``name``."""
        if (
            callbacks is not self._callbacks
            or len(callbacks) != self._count
            or type(module) is not self._module_type
        ):
            # a new stage, a callback appended, or another module
            self._callbacks, self._count, self._module_type, self._by_name = (
                callbacks,
                len(callbacks),
                type(module),
                {},
            )
        found = self._by_name.get(name)
        if found is None:
            from ember.trainer.module import TrainModule  # here: the module imports this one

            default = getattr(Callback, name, None)
            defining = [c for c in callbacks if default is None or _func(getattr(c, name)) is not default]
            module_default = getattr(TrainModule, name, None)
            overridden = module_default is None or getattr(type(module), name, None) is not module_default
            found = self._by_name[name] = (
                [c for c in defining if not c.monitoring],
                overridden,
                [c for c in defining if c.monitoring],
            )
        return found


def _func(method: Any) -> Any:
    return getattr(method, "__func__", method)


def call_hook(trainer: Trainer, name: str, *args: Any, part: str = "all", module_hook: bool = True) -> Any:
    """Call hook ``name`` on the callbacks and the module, in the documented order.

    ``part="first"`` stops before the monitoring callbacks and ``part="monitoring"`` calls only
    them: the loop does its own work in between (docs/concepts/hooks.md). Returns what the
    module's hook returned.
    """
    module = trainer.module
    first, overridden, monitoring = trainer._hook_plan.plan(trainer.callbacks, module, name)
    # The module's do-nothing default (and a hook no callback defines) is not called at all; a hook
    # set on the instance itself still is.
    module_hook = module_hook and (overridden or name in module.__dict__)
    if not (first or module_hook or monitoring):
        return None
    store = trainer._metrics
    previous, store.fx = store.fx, name
    result = None
    try:
        if part in ("all", "first"):
            for callback in first:
                getattr(callback, name)(trainer, module, *args)
            hook = getattr(module, name, None) if module_hook else None  # some hooks are callbacks' only
            if hook is not None:
                result = hook(*args)
        if part in ("all", "monitoring"):
            for callback in monitoring:
                getattr(callback, name)(trainer, module, *args)
        return result
    finally:
        store.fx = previous


def call_step(trainer: Trainer, name: str, *args: Any) -> Any:
    """Run ``module.<name>`` (training_step, validation_step ...) through the strategy and precision."""
    store = trainer._metrics
    previous, store.fx = store.fx, name
    try:
        module = trainer.module
        return trainer.accelerator.call_as_forward(trainer.model, getattr(module, name), *args)
    finally:
        store.fx = previous
