"""Loggers: ``CSVLogger`` (default), ``TensorBoardLogger``, ``WandbLogger``; the ``Logger`` interface.

Importing them is cheap: ``wandb`` and ``tensorboard`` are imported when a run first writes.
"""

from ember.trainer.loggers.base import Logger
from ember.trainer.loggers.csv import CSVLogger
from ember.trainer.loggers.tensorboard_logger import TensorBoardLogger
from ember.trainer.loggers.wandb_logger import WandbLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger", "WandbLogger"]
