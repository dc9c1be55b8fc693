"""Measure throughput (batches, samples, items and FLOPs per second) of each stage over a sliding window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ThroughputMonitor"]


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so the clock reads when the work is done, not when it was queued."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and device.type == accelerator.type:
        torch.accelerator.synchronize(device)


class _Window:
    """One stage's running totals at its last ``size`` updates (Lightning's ``Throughput``)."""

    def __init__(self, size: int) -> None:
        self.time: deque[float] = deque(maxlen=size)  # seconds since the stage started
        self.batches: deque[int] = deque(maxlen=size)
        self.samples: deque[int] = deque(maxlen=size)
        self.lengths: deque[int] = deque(maxlen=size)
        self.flops: deque[float] = deque(maxlen=size)  # each batch's FLOPs, on every process together

    def compute(self, world_size: int, separator: str) -> dict[str, float]:
        metrics: dict[str, float] = {
            "time": self.time[-1],
            "batches": self.batches[-1],
            "samples": self.samples[-1],
        }
        if self.lengths:
            metrics["lengths"] = self.lengths[-1]
        if len(self.time) < (self.time.maxlen or 0):  # rates once the window is full, as Lightning's
            return metrics
        elapsed = self.time[-1] - self.time[0]
        if elapsed <= 0:
            return metrics
        device = f"device{separator}"
        rates = {"batches_per_sec": (self.batches[-1] - self.batches[0]) / elapsed,
                 "samples_per_sec": (self.samples[-1] - self.samples[0]) / elapsed}  # fmt: skip
        if len(self.lengths) == self.lengths.maxlen:
            rates["items_per_sec"] = (self.lengths[-1] - self.lengths[0]) / elapsed
        for name, rate in rates.items():
            metrics[device + name] = rate
            if world_size > 1:  # the whole job's, on several processes only
                metrics[name] = rate * world_size
        if len(self.flops) == self.flops.maxlen:
            flops_per_sec = (sum(self.flops) - self.flops[0]) / elapsed  # (the first batch ended at time[0])
            metrics[device + "flops_per_sec"] = flops_per_sec / world_size
            if world_size > 1:
                metrics["flops_per_sec"] = flops_per_sec
        return metrics


class ThroughputMonitor(Callback):
    """Log the throughput of training, validation, testing and prediction, as Lightning's callback.

    ``batch_size_fn(batch)`` returns the number of samples in a batch and ``length_fn(batch)``
    (optional) its number of items (tokens). Each stage's row has ``{stage}/time`` (seconds since
    the stage started), ``{stage}/batches``, ``{stage}/samples`` and ``{stage}/lengths`` (totals),
    then, once ``window_size`` batches ended, the rates over the last ``window_size`` of them:
    ``{stage}/device/batches_per_sec``, ``.../samples_per_sec``, ``.../items_per_sec`` (with
    ``length_fn``) and ``.../flops_per_sec`` (when the module has a ``flops_per_batch``
    attribute); on several processes also the job's ``{stage}/batches_per_sec`` etc. ``stage`` is
    ``train``, ``validate``, ``test`` or ``predict``; ``separator`` replaces each ``/``. Rows are written on global rank 0, with the Trainer's training rows (``trainer.logs_this_batch``) and every ``log_every_n_steps`` evaluation batches; time spent
    in validation during ``fit`` is left out of the training rates. The device is synchronized only
    on the batches that log.

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
        separator: str = "/",
    ) -> None:
        if not callable(batch_size_fn):
            raise TypeError(f"ThroughputMonitor(batch_size_fn={batch_size_fn!r}) must be a callable")
        if length_fn is not None and not callable(length_fn):
            raise TypeError(f"ThroughputMonitor(length_fn={length_fn!r}) must be a callable or None")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2:
            raise ValueError(
                f"ThroughputMonitor(window_size={window_size!r}) must be an int >= 2 (a rate needs two batches)"
            )
        if not isinstance(separator, str):
            raise TypeError(f"ThroughputMonitor(separator={separator!r}) must be a string")
        self.batch_size_fn = batch_size_fn
        self.length_fn = length_fn
        self._window_size = window_size
        self._separator = separator
        self._windows: dict[str, _Window] = {}
        self._t0s: dict[str, float] = {}
        # Totals per stage: (batches, samples, lengths), and this run's batches (the step of its rows).
        self._totals: dict[str, list[int]] = {}
        self._run_batches: dict[str, int] = {}

    # -- stage boundaries -------------------------------------------------------------------------
    def _start(self, trainer: Trainer, stage: str) -> None:
        # As Lightning's: a fit starts its stages afresh; validate/test/predict called again go on counting.
        if trainer.stage == "fit" or stage not in self._totals:
            self._totals[stage] = [0, 0, 0]
        self._windows[stage] = _Window(self._window_size)
        self._t0s[stage] = time.perf_counter()
        self._run_batches[stage] = 0

    def _update(self, trainer: Trainer, module: TrainModule, stage: str, batch: Any, log: bool) -> None:
        if log:
            _synchronize(trainer.accelerator.device)
        elapsed = time.perf_counter() - self._t0s[stage]
        totals = self._totals[stage]
        totals[0] += 1
        totals[1] += int(self.batch_size_fn(batch))
        window = self._windows[stage]
        window.time.append(elapsed)
        window.batches.append(totals[0])
        window.samples.append(totals[1])
        if self.length_fn is not None:
            totals[2] += int(self.length_fn(batch))
            window.lengths.append(totals[2])
        flops = getattr(module, "flops_per_batch", None)
        if flops is not None:
            window.flops.append(float(flops) * trainer.world_size)
        self._run_batches[stage] += 1

    def _log(self, trainer: Trainer, stage: str, step: int, extra: dict[str, float] | None = None) -> None:
        metrics = self._windows[stage].compute(trainer.world_size, self._separator)
        row = {f"{stage}{self._separator}{key}": float(value) for key, value in metrics.items()}
        trainer.log_metrics({**row, **(extra or {})}, step=step)

    def _evaluation_batch(self, trainer: Trainer, module: TrainModule, stage: str, batch: Any) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or stage not in self._t0s:
            return
        log = (self._run_batches[stage] + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop
        self._update(trainer, module, stage, batch, log)
        if log:  # the step: this run's batches (Lightning's evaluation loop count)
            self._log(trainer, stage, self._run_batches[stage])

    # -- training ---------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "train")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or "train" not in self._t0s:
            return
        log = trainer.logs_this_batch  # the batches after which the Trainer writes a row
        self._update(trainer, module, "train", batch, log)
        if log:
            # The step of the Trainer's row for this batch (its optimizer step counted: Lightning's + 1).
            self._log(trainer, "train", trainer.global_step, {"epoch": float(trainer.current_epoch)})

    # -- evaluation -------------------------------------------------------------------------------
    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._start(trainer, "validate")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch(trainer, module, "validate", batch)

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.stage != "fit":
            return
        train, validate = self._windows.get("train"), self._windows.get("validate")
        if train is None or validate is None or "train" not in self._t0s:
            return
        # Move the training clock's start by the time from the last training batch to the last
        # validation batch, so validation does not count in the training rates.
        train_end = self._t0s["train"] + (train.time[-1] if train.time else 0.0)
        validate_end = self._t0s["validate"] + (validate.time[-1] if validate.time else 0.0)
        self._t0s["train"] += validate_end - train_end

    @override
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch(trainer, module, "test", batch)

    @override
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "predict")

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch(trainer, module, "predict", batch)

    def compute(self, stage: str = "train", world_size: int = 1) -> dict[str, float]:
        """``stage``'s current row, without the stage prefix (empty before its first batch ended)."""
        window = self._windows.get(stage)
        return {} if window is None or not window.time else window.compute(world_size, self._separator)
