"""The Trainer layer: ``TrainModule``, ``DataModule``, ``Trainer`` and loggers, built on the Accelerator."""

from ember.trainer.cli import TrainerCLI  # (jsonargparse loads when a TrainerCLI is built)
from ember.trainer.combined import CombinedLoader
from ember.trainer.loggers import CometLogger, CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from ember.trainer.lr_finder import LRFinder
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.optim import LRSchedulerConfig
from ember.trainer.preemption import Preempted
from ember.trainer.profilers import (
    AdvancedProfiler,
    PassThroughProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
    XLAProfiler,
)
from ember.trainer.trainer import Trainer
from ember.trainer.tuner import Tuner

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
