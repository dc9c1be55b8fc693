"""Names a package exports but imports on first use (PEP 562): a run that never names them never
pays for their modules (``ember.strategies``, ``ember.callbacks``, the Trainer layer's loggers ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__``: ``modules`` maps each lazy name to the module
    that defines it; the first lookup imports it and stores the name in ``namespace`` (the package's
    ``globals()``), so later lookups do not come back here."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *modules})

    return __getattr__, __dir__


def defer_registration(registry: Any, names: Iterable[str], module: str, cls: str, register: str) -> None:
    """Let ``registry`` know ``names`` now and import ``module`` on the first use of one of them:
    its class ``cls`` then registers them (``cls.register(registry)``, e.g. ``register_strategies``)."""

    def load() -> None:
        getattr(getattr(importlib.import_module(module), cls), register)(registry)

    registry.defer(names, load)
