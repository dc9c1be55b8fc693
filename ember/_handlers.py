"""What the Accelerator does with 🤗 Accelerate's ``kwargs_handlers`` and ``mixed_precision``: each
function answers at once where none was given, and loads :mod:`ember.kwargs_handlers` (five
dataclasses, ~3 ms of start-up) only where one was, so a run that passes neither never imports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.precision import Precision
    from ember.strategies import Strategy

__all__ = [
    "accelerate_precision",
    "check_handlers",
    "ddp_strategy",
    "handled_precision",
    "handler",
]


def check_handlers(handlers: Sequence[Any] | None) -> dict[type, Any]:
    """The handlers by kind (:func:`ember.kwargs_handlers.check_handlers`)."""
    if handlers is None:
        return {}
    from ember import kwargs_handlers

    return kwargs_handlers.check_handlers(handlers)


def accelerate_precision(precision: Any, mixed_precision: Any) -> Any:
    """``precision`` with Accelerate's ``mixed_precision`` spelling folded in."""
    if mixed_precision is None:
        return precision
    from ember import kwargs_handlers

    return kwargs_handlers.accelerate_precision(precision, mixed_precision)


def ddp_strategy(
    handlers: dict[type, Any], strategy: str | Strategy, world_size: int, device_type: str
) -> str | Strategy:
    """``strategy``, or the DDP strategy the handlers configure."""
    if not handlers:
        return strategy
    from ember import kwargs_handlers

    return kwargs_handlers.ddp_strategy(handlers, strategy, world_size, device_type)


def handled_precision(handlers: dict[type, Any], plugin: Precision, device_type: str) -> Precision:
    """``plugin``, or the mixed precision the handlers configure."""
    if not handlers:
        return plugin
    from ember import kwargs_handlers

    return kwargs_handlers.handled_precision(handlers, plugin, device_type)


def handler(handlers: dict[type, Any], kind: str) -> Any | None:
    """The handler of class ``kind`` (a name in :mod:`ember.kwargs_handlers`) among ``handlers``,
    or None. (``check_handlers`` accepts those exact classes only: one lookup by class.)"""
    if not handlers:
        return None
    from ember import kwargs_handlers

    return handlers.get(getattr(kwargs_handlers, kind))
