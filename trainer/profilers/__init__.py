"""``ember.trainer.profilers``: what ``Trainer(profiler=...)`` takes, as Lightning's profilers.

``profiler="simple"`` (:class:`SimpleProfiler`), ``"advanced"`` (:class:`AdvancedProfiler`),
``"pytorch"`` (:class:`PyTorchProfiler`), ``"xla"`` (:class:`XLAProfiler`), an instance of one of them or of your own
:class:`Profiler` subclass; ``None`` (the default) profiles nothing and costs nothing.

Each profiler's module loads on first use, of its class or of its name: a run without one never
imports cProfile, pstats or torch.profiler's helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import defer_registration, lazy_exports
from ember.trainer.profilers.base import PROFILER_REGISTRY, PassThroughProfiler, Profiler

if TYPE_CHECKING:
    from ember.trainer.profilers.advanced import AdvancedProfiler
    from ember.trainer.profilers.pytorch import PyTorchProfiler
    from ember.trainer.profilers.simple import SimpleProfiler
    from ember.trainer.profilers.xla import XLAProfiler

# class -> (its module, the registry names its ``register_profilers`` adds)
_PROFILERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "SimpleProfiler": ("ember.trainer.profilers.simple", ("simple",)),
    "AdvancedProfiler": ("ember.trainer.profilers.advanced", ("advanced",)),
    "PyTorchProfiler": ("ember.trainer.profilers.pytorch", ("pytorch",)),
    "XLAProfiler": ("ember.trainer.profilers.xla", ("xla",)),
}
for _cls, (_module, _names) in _PROFILERS.items():
    defer_registration(PROFILER_REGISTRY, _names, _module, _cls, "register_profilers")

__getattr__, __dir__ = lazy_exports(
    __name__, {cls: module for cls, (module, _) in _PROFILERS.items()}, globals()
)


__all__ = [
    "AdvancedProfiler",
    "PassThroughProfiler",
    "Profiler",
    "PyTorchProfiler",
    "SimpleProfiler",
    "XLAProfiler",
]
