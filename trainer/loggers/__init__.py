"""Loggers: ``CSVLogger`` (default); the ``Logger`` interface for others."""

from ember.trainer.loggers.base import Logger
from ember.trainer.loggers.csv import CSVLogger

__all__ = ["CSVLogger", "Logger"]
