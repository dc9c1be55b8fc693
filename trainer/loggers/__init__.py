"""Loggers: ``CSVLogger`` (default), ``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``,
``CometLogger``; the ``Logger`` interface.

Importing them is cheap: ``wandb``, ``tensorboard`` and ``mlflow`` are imported when a run first
writes, ``comet_ml`` when a ``CometLogger`` is made (it checks its arguments against Comet's).
"""

from ember.trainer.loggers.base import Logger
from ember.trainer.loggers.comet_logger import CometLogger
from ember.trainer.loggers.csv import CSVLogger
from ember.trainer.loggers.mlflow_logger import MLFlowLogger
from ember.trainer.loggers.tensorboard_logger import TensorBoardLogger
from ember.trainer.loggers.wandb_logger import WandbLogger

__all__ = ["CSVLogger", "CometLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]
