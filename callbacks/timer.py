"""Measure the time spent in each stage and stop training when a time budget runs out."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember._validation import check_bool
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["Timer"]

_STAGES = ("train", "validate", "test", "predict")
_INTERVALS = ("step", "epoch")
_ACCEPTED = (
    "a 'DD:HH:MM:SS' string such as '00:12:00:00', a datetime.timedelta, "
    "or a dict of timedelta keyword arguments such as {'hours': 12}"
)


def _parse_duration(duration: str | timedelta | dict[str, int] | None) -> timedelta | None:
    def invalid(reason: str = "") -> ValueError:
        return ValueError(f"Timer(duration={duration!r}) is not valid{reason}; expected {_ACCEPTED}")

    if duration is None:
        return None
    if isinstance(duration, timedelta):
        parsed = duration
    elif isinstance(duration, str):
        parts = duration.strip().split(":")
        if len(parts) != 4 or not all(part.isdigit() for part in parts):
            raise invalid()
        days, hours, minutes, seconds = (int(part) for part in parts)
        parsed = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(duration, dict):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in duration.values()):
            raise invalid(" (values must be numbers)")
        try:
            parsed = timedelta(**duration)
        except TypeError as error:  # an unknown keyword
            raise invalid(f" ({error})") from None
    else:
        raise invalid()
    if parsed < timedelta(0):
        raise invalid(" (it is negative)")
    return parsed


def _check_stage(stage: str) -> str:
    if stage not in _STAGES:
        raise ValueError(
            f"stage={stage!r} is not a Timer stage. Valid choices: {', '.join(map(repr, _STAGES))}"
        )
    return stage


class Timer(Callback):
    """Time each stage; with ``duration``, stop training once that much training time has passed.

    The clock is ``time.monotonic()``. Training time runs from ``on_train_start`` to
    ``on_train_end``, so validation inside ``fit`` counts against the budget. The elapsed time is
    saved in checkpoints, so a resumed run continues the clock instead of starting a fresh budget
    (and trains nothing when the restored time already spent it). ``verbose``: say when it stops.

    Example::

        timer = Timer(duration="00:11:30:00", interval="step")  # stop after 11.5 hours
        trainer = Trainer(callbacks=[timer])
        trainer.fit(module, loader)
        print(f"trained for {timer.time_elapsed('train'):.0f}s")
    """

    def __init__(
        self,
        duration: str | timedelta | dict[str, int] | None = None,
        interval: str = "step",
        verbose: bool = True,
    ) -> None:
        if interval not in _INTERVALS:
            raise ValueError(
                f"Timer(interval={interval!r}) is not supported. Valid choices: {', '.join(map(repr, _INTERVALS))}"
            )
        check_bool("verbose", verbose, owner="Timer")
        self._duration = _parse_duration(duration)
        self._verbose = verbose
        self._interval = interval
        self._start: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._end: dict[str, float | None] = dict.fromkeys(_STAGES)
        # Time restored from a checkpoint: what earlier runs already spent in each stage.
        self._offset: dict[str, float] = dict.fromkeys(_STAGES, 0.0)
        self._announced = False

    @property
    def duration(self) -> timedelta | None:
        return self._duration

    def start_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last started, or ``None`` if it has not."""
        return self._start[_check_stage(stage)]

    def end_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last ended, or ``None`` if it has not (yet)."""
        return self._end[_check_stage(stage)]

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage``, including time restored from a checkpoint."""
        start, end = self._start[_check_stage(stage)], self._end[stage]
        if start is None:
            return self._offset[stage]
        return self._offset[stage] + ((time.monotonic() if end is None else end) - start)

    def time_remaining(self, stage: str = "train") -> float | None:
        """Seconds left of ``duration`` for ``stage`` (negative once exceeded); ``None`` without a duration."""
        if self._duration is None:
            return None
        return self._duration.total_seconds() - self.time_elapsed(stage)

    # -- stage boundaries -------------------------------------------------------------------------
    def _begin(self, stage: str) -> None:
        self._start[stage] = time.monotonic()
        self._end[stage] = None

    def _finish(self, stage: str) -> None:
        self._end[stage] = time.monotonic()

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("train")

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("train")

    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("validate")

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("validate")

    @override
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("test")

    @override
    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("test")

    @override
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("predict")

    @override
    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("predict")

    # -- stopping ---------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        # After a resumed fit restored the clock (the Trainer's order), at either interval: a
        # checkpoint saved once the budget ran out trains no further batch, as Lightning's.
        self._stop_if_expired(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._interval == "step":
            self._stop_if_expired(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._interval == "epoch":
            self._stop_if_expired(trainer)

    def _stop_if_expired(self, trainer: Trainer) -> None:
        if self._duration is None:
            return
        expired = self.time_elapsed("train") >= self._duration.total_seconds()
        if trainer.world_size > 1:
            # Clocks drift apart across processes; if ranks decided on their own, one could stop
            # while the others wait in a collective forever. Rank 0 decides for everyone. The flag
            # lives on the accelerator's device because NCCL cannot broadcast CPU tensors.
            flag = torch.tensor([int(expired)], device=trainer.accelerator.device)
            flag = trainer.accelerator.broadcast(flag, from_process=0)
            expired = bool(flag.item())
        if expired:
            trainer.should_stop = True
            if self._verbose and trainer.is_global_zero and not self._announced:
                self._announced = True
                print(f"Timer: time limit of {self._duration} reached; stopping training.", flush=True)

    # -- checkpoints ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in _STAGES}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        elapsed = state_dict.get("time_elapsed", {})
        # Restored before `on_train_start` (the Trainer's order), so the clock of this run starts at 0
        # and adds to the restored time.
        self._offset = {stage: float(elapsed.get(stage, 0.0)) for stage in _STAGES}
