"""The Trainer layer: ``TrainModule``, ``DataModule``, ``Trainer`` and loggers, built on the Accelerator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import lazy_exports
from ember.trainer.combined import CombinedLoader
from ember.trainer.loggers import CSVLogger, Logger
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.optim import LRSchedulerConfig
from ember.trainer.preemption import Preempted
from ember.trainer.profilers import PassThroughProfiler, Profiler
from ember.trainer.trainer import Trainer

if TYPE_CHECKING:
    from ember.trainer.cli import TrainerCLI
    from ember.trainer.loggers import CometLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
    from ember.trainer.lr_finder import LRFinder
    from ember.trainer.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler, XLAProfiler
    from ember.trainer.tuner import Tuner

# What a default fit does not use loads on first use of its name: the CLI, the other loggers, the profilers,
# the Tuner and its LRFinder.
_LAZY = {
    "AdvancedProfiler": "ember.trainer.profilers",
    "CometLogger": "ember.trainer.loggers",
    "LRFinder": "ember.trainer.lr_finder",
    "MLFlowLogger": "ember.trainer.loggers",
    "PyTorchProfiler": "ember.trainer.profilers",
    "SimpleProfiler": "ember.trainer.profilers",
    "TensorBoardLogger": "ember.trainer.loggers",
    "TrainerCLI": "ember.trainer.cli",  # (jsonargparse loads when a TrainerCLI is built)
    "Tuner": "ember.trainer.tuner",
    "WandbLogger": "ember.trainer.loggers",
    "XLAProfiler": "ember.trainer.profilers",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "AdvancedProfiler",
    "CSVLogger",
    "CombinedLoader",
    "CometLogger",
    "DataModule",
    "LRFinder",
    "LRSchedulerConfig",
    "Logger",
    "MLFlowLogger",
    "PassThroughProfiler",
    "Preempted",
    "Profiler",
    "PyTorchProfiler",
    "SimpleProfiler",
    "TensorBoardLogger",
    "TrainModule",
    "Trainer",
    "TrainerCLI",
    "Tuner",
    "WandbLogger",
    "XLAProfiler",
]
