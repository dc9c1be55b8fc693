"""``ember.trainer.profilers``: what ``Trainer(profiler=...)`` takes, as Lightning's profilers.

``profiler="simple"`` (:class:`SimpleProfiler`), ``"advanced"`` (:class:`AdvancedProfiler`),
``"pytorch"`` (:class:`PyTorchProfiler`), ``"xla"`` (:class:`XLAProfiler`), an instance of one of them or of your own
:class:`Profiler` subclass; ``None`` (the default) profiles nothing and costs nothing.

Each profiler's module loads on first use, of its class or of its name: a run without one never
imports cProfile, pstats or torch.profiler's helpers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.trainer.profilers.base import PROFILER_REGISTRY, PassThroughProfiler, Profiler

if TYPE_CHECKING:
    from ember.trainer.profilers.advanced import AdvancedProfiler
    from ember.trainer.profilers.pytorch import PyTorchProfiler
    from ember.trainer.profilers.simple import SimpleProfiler
    from ember.trainer.profilers.xla import XLAProfiler

# class -> (its module, the registry names its ``register_profilers`` adds)
_LAZY: dict[str, tuple[str, tuple[str, ...]]] = {
    "SimpleProfiler": ("ember.trainer.profilers.simple", ("simple",)),
    "AdvancedProfiler": ("ember.trainer.profilers.advanced", ("advanced",)),
    "PyTorchProfiler": ("ember.trainer.profilers.pytorch", ("pytorch",)),
    "XLAProfiler": ("ember.trainer.profilers.xla", ("xla",)),
}


def _class(name: str) -> type[Profiler]:
    cls: type[Profiler] = getattr(importlib.import_module(_LAZY[name][0]), name)
    return cls


def _loader(name: str) -> Callable[[], None]:
    def load() -> None:
        _class(name).register_profilers(PROFILER_REGISTRY)

    return load


for _name, (_, _names) in _LAZY.items():
    PROFILER_REGISTRY.defer(_names, _loader(_name))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = _class(name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdvancedProfiler",
    "PassThroughProfiler",
    "Profiler",
    "PyTorchProfiler",
    "SimpleProfiler",
    "XLAProfiler",
]
