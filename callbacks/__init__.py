"""Trainer callbacks: the ``Callback`` base and the built-ins."""

from ember.callbacks.base import Callback
from ember.callbacks.early_stopping import EarlyStopping
from ember.callbacks.lr_monitor import LearningRateMonitor
from ember.callbacks.model_checkpoint import ModelCheckpoint
from ember.callbacks.model_summary import ModelSummary
from ember.callbacks.nan_guard import NonFiniteGuard
from ember.callbacks.progress import RichProgressBar
from ember.callbacks.run_summary import RunSummary
from ember.callbacks.throughput import ThroughputMonitor
from ember.callbacks.timer import Timer

__all__ = [
    "Callback",
    "EarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "NonFiniteGuard",
    "RichProgressBar",
    "RunSummary",
    "ThroughputMonitor",
    "Timer",
]
