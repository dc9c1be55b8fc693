"""The Trainer layer: ``TrainModule``, ``DataModule``, ``Trainer`` and loggers, built on the Accelerator."""

from ember.trainer.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.optim import LRSchedulerConfig
from ember.trainer.preemption import Preempted
from ember.trainer.trainer import Trainer

__all__ = [
    "CSVLogger",
    "DataModule",
    "LRSchedulerConfig",
    "Logger",
    "Preempted",
    "TensorBoardLogger",
    "TrainModule",
    "Trainer",
    "WandbLogger",
]
