"""``LambdaCallback``: a callback made of functions, one per hook, without writing a class."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from ember._validation import show
from ember.callbacks.base import Callback

__all__ = ["LambdaCallback"]

#: The hooks a callback may define: ``setup``, ``teardown`` and every ``on_*`` hook of :class:`Callback`.
_HOOK_NAMES: tuple[str, ...] = tuple(
    sorted(name for name in vars(Callback) if name in ("setup", "teardown") or name.startswith("on_"))
)

_instances = itertools.count()  # numbers each LambdaCallback: several may define the same hooks


class LambdaCallback(Callback):
    """A callback whose hooks are the functions given by keyword, each called as the hook would be
    (``trainer, module, *hook arguments``). An unknown hook name is a ``TypeError`` naming the
    nearest hook; a value that is not callable is a ``TypeError`` too; ``None`` defines nothing.

    Example::

        LambdaCallback(
            on_fit_start=lambda trainer, module: print("fit starts"),
            on_train_batch_end=lambda trainer, module, outputs, batch, batch_idx: print(batch_idx),
        )
    """

    def __init__(self, **hooks: Callable[..., Any] | None) -> None:
        for name, function in hooks.items():
            if name not in _HOOK_NAMES:
                near = difflib.get_close_matches(name, _HOOK_NAMES, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise TypeError(
                    f"LambdaCallback({name}=...): {name!r} is not a callback hook; {hint}"
                    f"valid hooks: {', '.join(_HOOK_NAMES)}"
                )
            if function is not None and not callable(function):
                raise TypeError(
                    f"LambdaCallback({name}={show(function)}) must be a function taking "
                    f"(trainer, module, ...) as the {name} hook does, or None"
                )
        self.hooks: dict[str, Callable[..., Any]] = {k: v for k, v in hooks.items() if v is not None}
        for name, function in self.hooks.items():
            # An instance attribute in place of the do-nothing method: the Trainer's hook plan sees
            # that this callback defines the hook, and binds (trainer, module) in front, as for a method.
            setattr(self, name, function)
        self._index = next(_instances)

    @property
    @override
    def state_key(self) -> str:
        # It saves no state; the number keeps two LambdaCallbacks with the same hooks apart.
        return f"LambdaCallback#{self._index}[{','.join(self.hooks)}]"

    def __repr__(self) -> str:
        return f"LambdaCallback({', '.join(f'{k}=...' for k in self.hooks)})"
