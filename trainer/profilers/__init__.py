"""``ember.trainer.profilers``: what ``Trainer(profiler=...)`` takes, as Lightning's profilers.

``profiler="simple"`` (:class:`SimpleProfiler`), ``"advanced"`` (:class:`AdvancedProfiler`),
``"pytorch"`` (:class:`PyTorchProfiler`), ``"xla"`` (:class:`XLAProfiler`), an instance of one of them or of your own
:class:`Profiler` subclass; ``None`` (the default) profiles nothing and costs nothing.
"""

from ember.trainer.profilers.advanced import AdvancedProfiler
from ember.trainer.profilers.base import PROFILER_REGISTRY, PassThroughProfiler, Profiler
from ember.trainer.profilers.pytorch import PyTorchProfiler
from ember.trainer.profilers.simple import SimpleProfiler
from ember.trainer.profilers.xla import XLAProfiler

__all__ = [
    "AdvancedProfiler",
    "PassThroughProfiler",
    "Profiler",
    "PyTorchProfiler",
    "SimpleProfiler",
    "XLAProfiler",
]

for _profiler in (SimpleProfiler, AdvancedProfiler, PyTorchProfiler, XLAProfiler):
    _profiler.register_profilers(PROFILER_REGISTRY)
