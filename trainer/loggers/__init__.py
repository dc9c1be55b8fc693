"""Loggers: ``CSVLogger`` (default), ``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``,
``CometLogger``; the ``Logger`` interface.

Importing them is cheap: ``wandb``, ``tensorboard`` and ``mlflow`` are imported when a run first
writes, ``comet_ml`` when a ``CometLogger`` is made (it checks its arguments against Comet's).
Only the default's modules load with the Trainer; the others on first use of their name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import lazy_exports
from ember.trainer.loggers.base import Logger
from ember.trainer.loggers.csv import CSVLogger

if TYPE_CHECKING:
    from ember.trainer.loggers.comet_logger import CometLogger
    from ember.trainer.loggers.mlflow_logger import MLFlowLogger
    from ember.trainer.loggers.tensorboard_logger import TensorBoardLogger
    from ember.trainer.loggers.wandb_logger import WandbLogger

_LAZY = {
    "CometLogger": "ember.trainer.loggers.comet_logger",
    "MLFlowLogger": "ember.trainer.loggers.mlflow_logger",
    "TensorBoardLogger": "ember.trainer.loggers.tensorboard_logger",
    "WandbLogger": "ember.trainer.loggers.wandb_logger",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = ["CSVLogger", "CometLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]
