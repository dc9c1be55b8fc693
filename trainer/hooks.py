"""The hook contract: :func:`call_hook` dispatches every hook.

Each hook runs on the callbacks, then on the module, then on the *monitoring* callbacks
(``ModelCheckpoint``, ``EarlyStopping``), which thus see everything the module logged in it.
The order of the hooks is written down once, in ``docs/concepts/hooks.md``;
``tests/trainer/test_hook_order.py`` locks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["call_hook"]


def call_hook(trainer: Trainer, name: str, *args: Any, part: str = "all", module_hook: bool = True) -> Any:
    """Call hook ``name`` on the callbacks and the module, in the documented order.

    ``part="first"`` stops before the monitoring callbacks and ``part="monitoring"`` calls only
    them: the loop does its own work in between (docs/concepts/hooks.md). Returns what the
    module's hook returned.
    """
    module = trainer.module
    callbacks = trainer.callbacks
    store = trainer._metrics
    previous, store.fx = store.fx, name
    result = None
    try:
        if part in ("all", "first"):
            for callback in callbacks:
                if not callback.monitoring:
                    getattr(callback, name)(trainer, module, *args)
            hook = getattr(module, name, None) if module_hook else None  # some hooks are callbacks' only
            if hook is not None:
                result = hook(*args)
        if part in ("all", "monitoring"):
            for callback in callbacks:
                if callback.monitoring:
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
