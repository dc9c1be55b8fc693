"""Measure training throughput (batches, samples and tokens per second) over a sliding window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ThroughputMonitor"]


class _Mark(NamedTuple):
    """Running totals at the end of a training batch."""

    time: float  # perf_counter, minus the time spent in validation
    batches: int
    samples: int
    tokens: int


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so the clock reads when the work is done, not when it was queued."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and device.type == accelerator.type:
        torch.accelerator.synchronize(device)


class ThroughputMonitor(Callback):
    """Log training speed every ``trainer.log_every_n_steps`` batches.

    ``batch_size_fn(batch)`` returns the number of samples in a batch and ``length_fn(batch)``
    (optional) the number of tokens. Rates are computed over the last ``window_size`` batches and
    include data loading; time spent in validation during ``fit`` is left out. Logged keys:
    ``train/batches_per_sec``, ``train/samples_per_sec`` and ``train/tokens_per_sec`` for the whole
    job (this process's rate times ``trainer.world_size``), and ``train/device/samples_per_sec``,
    ``train/device/tokens_per_sec`` for this process. The device is synchronized only on the
    batches that log, so the other batches run without a host-device round trip.

    Example::

        monitor = ThroughputMonitor(
            batch_size_fn=lambda batch: batch["input_ids"].shape[0],
            length_fn=lambda batch: batch["input_ids"].numel(),
        )
        trainer = Trainer(logger=CSVLogger("logs"), callbacks=[monitor])
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Callable[[Any], int] | None = None,
        window_size: int = 100,
    ) -> None:
        if not callable(batch_size_fn):
            raise TypeError(f"ThroughputMonitor(batch_size_fn={batch_size_fn!r}) must be a callable")
        if length_fn is not None and not callable(length_fn):
            raise TypeError(f"ThroughputMonitor(length_fn={length_fn!r}) must be a callable or None")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"ThroughputMonitor(window_size={window_size!r}) must be an int >= 1")
        self._batch_size_fn = batch_size_fn
        self._length_fn = length_fn
        # window_size batches need window_size + 1 marks: the one before the first batch of the window.
        self._marks: deque[_Mark] = deque(maxlen=window_size + 1)
        self._paused = 0.0  # seconds spent in validation since training started
        self._validation_started: float | None = None

    def _now(self) -> float:
        return time.perf_counter() - self._paused

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._marks.clear()
        self._paused = 0.0
        self._marks.append(_Mark(self._now(), 0, 0, 0))

    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._validation_started = time.perf_counter()

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._validation_started is not None:
            self._paused += time.perf_counter() - self._validation_started
            self._validation_started = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only global rank 0 writes to the loggers, so only it needs the numbers.
        if not trainer.is_global_zero or not self._marks:
            return
        last = self._marks[-1]
        batches = last.batches + 1
        logging_now = batches % trainer.log_every_n_steps == 0
        if logging_now:
            _synchronize(trainer.accelerator.device)
        tokens = last.tokens + (int(self._length_fn(batch)) if self._length_fn is not None else 0)
        samples = last.samples + int(self._batch_size_fn(batch))
        self._marks.append(_Mark(self._now(), batches, samples, tokens))
        if logging_now:
            metrics = self.compute(trainer.world_size)
            if metrics:
                trainer.log_metrics(metrics, step=trainer.global_step)

    def compute(self, world_size: int = 1) -> dict[str, float]:
        """The rates over the current window (empty before the first batch has ended)."""
        if len(self._marks) < 2:
            return {}
        first, last = self._marks[0], self._marks[-1]
        elapsed = last.time - first.time
        if elapsed <= 0:
            return {}
        batches_per_sec = (last.batches - first.batches) / elapsed
        samples_per_sec = (last.samples - first.samples) / elapsed
        metrics = {
            "train/batches_per_sec": batches_per_sec * world_size,
            "train/samples_per_sec": samples_per_sec * world_size,
            "train/device/samples_per_sec": samples_per_sec,
        }
        if self._length_fn is not None:
            tokens_per_sec = (last.tokens - first.tokens) / elapsed
            metrics["train/tokens_per_sec"] = tokens_per_sec * world_size
            metrics["train/device/tokens_per_sec"] = tokens_per_sec
        return metrics
