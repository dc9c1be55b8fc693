"""Loggers: ``CSVLogger`` (default), ``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``; the
``Logger`` interface.

Importing them is cheap: ``wandb``, ``tensorboard`` and ``mlflow`` are imported when a run first writes.
"""

from ember.trainer.loggers.base import Logger
from ember.trainer.loggers.csv import CSVLogger
from ember.trainer.loggers.mlflow_logger import MLFlowLogger
from ember.trainer.loggers.tensorboard_logger import TensorBoardLogger
from ember.trainer.loggers.wandb_logger import WandbLogger

__all__ = ["CSVLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]
