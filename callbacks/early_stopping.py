"""``EarlyStopping``: stop the fit when a monitored metric stops improving."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from typing_extensions import override

from ember._validation import check_bool, check_number, check_str
from ember.callbacks.base import Callback, acts_after_validation, acts_at_train_epoch_end

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["EarlyStopping", "EarlyStoppingReason"]


class EarlyStoppingReason(Enum):
    """Why :class:`EarlyStopping` stopped the fit (its ``stopping_reason``), as Lightning's enum.

    Example::

        if stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED: ...
    """

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` checks.

    Checked at the end of each training epoch (after its validation), or after each validation run
    when validation runs several times an epoch or every few epochs (``check_on_train_epoch_end``
    decides when given).
    Also stops at once when the value passes ``stopping_threshold`` (strictly better), passes
    ``divergence_threshold``, or (with ``check_finite``) becomes NaN/inf. ``stopping_reason`` and
    ``stopping_reason_message`` say why it stopped.

    Example::

        EarlyStopping(monitor="val_loss", mode="min", patience=3, min_delta=1e-3)
    """

    monitoring = True

    #: Lightning's comparisons and their signs, by ``mode``.
    mode_dict: ClassVar[dict[str, Callable[[torch.Tensor, Any], torch.Tensor]]] = {
        "min": torch.lt,
        "max": torch.gt,
    }
    order_dict: ClassVar[dict[str, str]] = {"min": "<", "max": ">"}

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        verbose: bool = False,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}): valid choices are 'min', 'max'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}) must be an int >= 0")
        check_str("monitor", monitor, owner="EarlyStopping")
        check_number("min_delta", min_delta, owner="EarlyStopping")
        for name, flag in (
            ("strict", strict),
            ("check_finite", check_finite),
            ("verbose", verbose),
            ("log_rank_zero_only", log_rank_zero_only),
        ):
            check_bool(name, flag, owner="EarlyStopping")
        check_bool("check_on_train_epoch_end", check_on_train_epoch_end, owner="EarlyStopping", optional=True)
        for name, threshold in (
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ):
            check_number(name, threshold, finite=False, optional=True, owner="EarlyStopping")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta = min_delta  # (its sign kept, as Lightning: negative lets a worse value improve)
        self.strict, self.check_finite, self.verbose = strict, check_finite, verbose
        self.log_rank_zero_only = log_rank_zero_only
        self.stopping_threshold, self.divergence_threshold = stopping_threshold, divergence_threshold
        self.wait_count = 0
        self.stopped_epoch = 0  # (Lightning's: 0 when it never stopped)
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.check_on_train_epoch_end = check_on_train_epoch_end

    @property
    def monitor_op(self) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``torch.lt`` (``mode="min"``) or ``torch.gt``: is the first value better (Lightning's)."""
        return self.mode_dict[self.mode]

    @property
    def stop_reason(self) -> str:
        """Ember's earlier name of :attr:`stopping_reason_message` (``""`` when it never stopped)."""
        return self.stopping_reason_message or ""

    @property
    @override
    def state_key(self) -> str:
        return f"EarlyStopping[monitor={self.monitor},mode={self.mode}]"

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if acts_after_validation(trainer, self.check_on_train_epoch_end):
            self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if acts_at_train_epoch_end(trainer, self.check_on_train_epoch_end):
            self._check(trainer)

    def _improved(self, value: torch.Tensor) -> bool:
        # Lightning's arithmetic, in the value's dtype (a float32 value minus min_delta is rounded
        # to float32, and so is a threshold compared with it): the same decisions at a tie.
        if self.mode == "min":
            return bool(value + self.min_delta < self.best_score)
        return bool(value - self.min_delta > self.best_score)

    def _decide(self, current: float | torch.Tensor) -> str:
        """The message of the reason to stop now, or "" to go on (see :meth:`_evaluate`)."""
        reason, message = self._evaluate(current)
        return message if reason is not EarlyStoppingReason.NOT_STOPPED else ""

    def _evaluate(self, current: float | torch.Tensor) -> tuple[EarlyStoppingReason, str]:
        """Why to stop now (``NOT_STOPPED`` to go on) and the message (``""``: nothing to say);
        updates the best value and the patience counter. Compared in the logged value's dtype, as
        Lightning compares (a Python number: float64 here, logged_values.as_scalar)."""
        value = torch.as_tensor(current, dtype=None if isinstance(current, torch.Tensor) else torch.float64)
        value = value.detach().cpu()
        if value.dtype not in (torch.float32, torch.float64):  # (half, bfloat16, integers: as Lightning's)
            value = value.float()
        better = self.monitor_op  # (a 0-dim bool tensor)
        reason = EarlyStoppingReason
        current = float(value)
        if self.check_finite and not math.isfinite(current):
            return reason.NON_FINITE_METRIC, (
                f"{self.monitor} = {current} is not finite (best so far {self.best_score:.3f}): stopping"
            )
        if self.stopping_threshold is not None and better(value, self.stopping_threshold):  # (strictly)
            return reason.STOPPING_THRESHOLD, (
                f"{self.monitor} = {current} reached stopping_threshold={self.stopping_threshold}: stopping"
            )
        if self.divergence_threshold is not None and better(-value, -self.divergence_threshold):
            return reason.DIVERGENCE_THRESHOLD, (
                f"{self.monitor} = {current} is past divergence_threshold={self.divergence_threshold}: stopping"
            )
        if self._improved(value):
            was = self.best_score
            self.best_score, self.wait_count = current, 0
            by = (
                f" by {abs(was - current):.3f} (min_delta={abs(self.min_delta)})"
                if math.isfinite(was)
                else ""
            )
            return reason.NOT_STOPPED, f"{self.monitor} improved{by}: best {current:.3f}"
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return reason.PATIENCE_EXHAUSTED, (
                f"{self.monitor} did not improve in {self.wait_count} checks (best {self.best_score:.3f}): stopping"
            )
        return reason.NOT_STOPPED, ""

    def _check(self, trainer: Trainer) -> None:
        if trainer.fast_dev_run:  # as Lightning: a smoke test of the loop is never stopped early
            return
        if self.monitor not in trainer.callback_metrics:
            message = (
                f"EarlyStopping(monitor={self.monitor!r}) could not find {self.monitor!r} in the logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Log it with self.log({self.monitor!r}, ...) or fix the name."
            )
            if self.strict:
                raise KeyError(message)
            if self.verbose and trainer.is_global_zero:  # as Lightning: strict=False skips, verbose says so
                warnings.warn(f"{message} strict=False: this check is skipped", RuntimeWarning, stacklevel=3)
            return
        reason, message = self._evaluate(trainer.callback_metrics[self.monitor])
        # Every process must stop together: stop if any process wants to. The reduced value is the
        # reason, so that every process knows one (the largest code among those that asked).
        # On the accelerator's device: NCCL communicates no host tensor.
        code = torch.tensor([float(reason.value)], device=trainer.accelerator.device)
        agreed = EarlyStoppingReason(int(trainer.accelerator.reduce(code, "max").item()))
        if agreed is not EarlyStoppingReason.NOT_STOPPED:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = agreed
            self.stopping_reason_message = (
                message if reason is agreed else f"another process asked to stop ({agreed.name})"
            )
        if message and self.verbose:
            self._say(trainer, message)

    def _say(self, trainer: Trainer, message: str) -> None:
        """``verbose``: print ``message`` on every process (prefixed with its rank when there are
        several), or on global rank 0 alone with ``log_rank_zero_only``; as Lightning."""
        prefix = ""
        if trainer.world_size > 1:
            if self.log_rank_zero_only and not trainer.is_global_zero:
                return
            prefix = f"[rank: {trainer.global_rank}] "
        print(f"{prefix}EarlyStopping: {message}", flush=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score,
                "patience": self.patience, "stopping_reason": self.stopping_reason.value,
                "stopping_reason_message": self.stopping_reason_message}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]
        # (older checkpoints hold neither)
        self.stopping_reason = EarlyStoppingReason(state_dict.get("stopping_reason", 0))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
