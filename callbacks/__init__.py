"""Trainer callbacks: the ``Callback`` base and the built-ins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import lazy_exports
from ember.callbacks.base import Callback, Checkpoint

if TYPE_CHECKING:
    from ember.callbacks.backbone_finetuning import BackboneFinetuning
    from ember.callbacks.batch_size_finder import BatchSizeFinder
    from ember.callbacks.device_stats_monitor import DeviceStatsMonitor
    from ember.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
    from ember.callbacks.finetuning import BaseFinetuning
    from ember.callbacks.gradient_accumulation_scheduler import GradientAccumulationScheduler
    from ember.callbacks.lambda_function import LambdaCallback
    from ember.callbacks.lr_finder import LearningRateFinder
    from ember.callbacks.lr_monitor import LearningRateMonitor
    from ember.callbacks.model_checkpoint import ModelCheckpoint
    from ember.callbacks.model_summary import ModelSummary, RichModelSummary
    from ember.callbacks.nan_guard import NonFiniteGuard
    from ember.callbacks.on_exception_checkpoint import OnExceptionCheckpoint
    from ember.callbacks.prediction_writer import BasePredictionWriter
    from ember.callbacks.progress import RichProgressBar
    from ember.callbacks.progress_bar import ProgressBar
    from ember.callbacks.pruning import ModelPruning
    from ember.callbacks.rich_theme import RichProgressBarTheme
    from ember.callbacks.run_summary import RunSummary
    from ember.callbacks.spike_detection import SpikeDetection, TrainingSpikeException
    from ember.callbacks.swa import StochasticWeightAveraging
    from ember.callbacks.throughput import ThroughputMonitor
    from ember.callbacks.timer import Timer
    from ember.callbacks.tqdm_progress import TQDMProgressBar
    from ember.callbacks.weight_averaging import EMAWeightAveraging, WeightAveraging

# Each built-in loads on first use (the Trainer's default callbacks, or `from ember.callbacks import ...`),
# not with `import ember.callbacks`: a run pays only for the callbacks it uses. The rich-drawn ones matter
# most: rich's console/table/progress modules cost ~40 ms to import and, on top of torch's heap, push the
# interpreter into a full garbage collection (~80 ms more).
_LAZY = {
    "BackboneFinetuning": "ember.callbacks.backbone_finetuning",
    "BaseFinetuning": "ember.callbacks.finetuning",
    "BasePredictionWriter": "ember.callbacks.prediction_writer",
    "BatchSizeFinder": "ember.callbacks.batch_size_finder",
    "DeviceStatsMonitor": "ember.callbacks.device_stats_monitor",
    "EMAWeightAveraging": "ember.callbacks.weight_averaging",
    "EarlyStopping": "ember.callbacks.early_stopping",
    "EarlyStoppingReason": "ember.callbacks.early_stopping",
    "GradientAccumulationScheduler": "ember.callbacks.gradient_accumulation_scheduler",
    "LambdaCallback": "ember.callbacks.lambda_function",
    "LearningRateFinder": "ember.callbacks.lr_finder",
    "LearningRateMonitor": "ember.callbacks.lr_monitor",
    "ModelCheckpoint": "ember.callbacks.model_checkpoint",
    "ModelPruning": "ember.callbacks.pruning",
    "ModelSummary": "ember.callbacks.model_summary",
    "NonFiniteGuard": "ember.callbacks.nan_guard",
    "OnExceptionCheckpoint": "ember.callbacks.on_exception_checkpoint",
    "ProgressBar": "ember.callbacks.progress_bar",
    "RichModelSummary": "ember.callbacks.model_summary",
    "RichProgressBar": "ember.callbacks.progress",
    "RichProgressBarTheme": "ember.callbacks.rich_theme",
    "RunSummary": "ember.callbacks.run_summary",
    "SpikeDetection": "ember.callbacks.spike_detection",
    "StochasticWeightAveraging": "ember.callbacks.swa",
    "TQDMProgressBar": "ember.callbacks.tqdm_progress",
    "ThroughputMonitor": "ember.callbacks.throughput",
    "Timer": "ember.callbacks.timer",
    "TrainingSpikeException": "ember.callbacks.spike_detection",
    "WeightAveraging": "ember.callbacks.weight_averaging",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "BackboneFinetuning",
    "BaseFinetuning",
    "BasePredictionWriter",
    "BatchSizeFinder",
    "Callback",
    "Checkpoint",
    "DeviceStatsMonitor",
    "EMAWeightAveraging",
    "EarlyStopping",
    "EarlyStoppingReason",
    "GradientAccumulationScheduler",
    "LambdaCallback",
    "LearningRateFinder",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelPruning",
    "ModelSummary",
    "NonFiniteGuard",
    "OnExceptionCheckpoint",
    "ProgressBar",
    "RichModelSummary",
    "RichProgressBar",
    "RichProgressBarTheme",
    "RunSummary",
    "SpikeDetection",
    "StochasticWeightAveraging",
    "TQDMProgressBar",
    "ThroughputMonitor",
    "Timer",
    "TrainingSpikeException",
    "WeightAveraging",
]
