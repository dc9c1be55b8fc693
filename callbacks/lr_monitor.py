"""Log the learning rate (and optionally the momentum) of every optimizer's parameter groups."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["LearningRateMonitor"]

_INTERVALS = (None, "step", "epoch")


def _optimizer_prefixes(optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
    """``lr-{Class}`` per optimizer, with ``-{k}`` appended to each of several sharing a class."""
    names = [type(optimizer).__name__ for optimizer in optimizers]
    counts = Counter(names)
    seen: Counter[str] = Counter()
    prefixes = []
    for name in names:
        if counts[name] > 1:
            prefixes.append(f"lr-{name}-{seen[name]}")
            seen[name] += 1
        else:
            prefixes.append(f"lr-{name}")
    return prefixes


def _momentum(group: dict[str, Any]) -> float | None:
    """SGD/RMSprop-style ``momentum``, or beta1 for the Adam family; ``None`` when neither exists."""
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return None


def _learning_rates(optimizers: Sequence[torch.optim.Optimizer], log_momentum: bool) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for prefix, optimizer in zip(_optimizer_prefixes(optimizers), optimizers, strict=True):
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            if len(groups) == 1:
                name = prefix
            else:  # a group may carry its own name: `{"params": ..., "name": "backbone"}`
                name = f"{prefix}/{group.get('name', f'pg{i}')}"
            # float() also covers a tensor learning rate (e.g. Adam(lr=torch.tensor(1e-3))).
            metrics[name] = float(group["lr"])
            momentum = _momentum(group) if log_momentum else None
            if momentum is not None:
                metrics[f"{name}/momentum"] = momentum
    return metrics


class LearningRateMonitor(Callback):
    """Log each parameter group's learning rate through the Trainer's loggers.

    Metric names are ``lr-{OptimizerClass}`` for an optimizer with one parameter group and
    ``lr-{OptimizerClass}/pg{i}`` (or ``/{name}`` for a group with a ``"name"`` key) for several.
    Optimizers that share a class get a ``-{k}`` suffix, ``k`` counting from 0 in
    ``trainer.optimizers`` order. With ``log_momentum`` the momentum (beta1 for Adam-style
    optimizers) is logged as ``<lr name>/momentum``.

    ``logging_interval`` is ``"step"`` (every ``log_every_n_steps`` training batches), ``"epoch"``
    (at the start of each epoch) or ``None`` (same as ``"step"``).

    Example::

        trainer = Trainer(logger=CSVLogger("logs"), callbacks=[LearningRateMonitor("step")])
        trainer.fit(module, loader)  # logs "lr-AdamW" every log_every_n_steps batches
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is not supported. "
                f"Valid choices: {', '.join(map(repr, _INTERVALS))}"
            )
        self._interval = logging_interval
        self._log_momentum = log_momentum

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.loggers:
            raise RuntimeError(
                "LearningRateMonitor needs a logger to write to, but the Trainer has none. "
                "Pass one with Trainer(logger=...) or remove the LearningRateMonitor callback."
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if self._interval == "epoch":
            return
        # Same cadence as the Trainer's own metric logging, counted across epochs.
        if trainer.total_batch_idx % trainer.log_every_n_steps == 0:
            self._log(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._interval == "epoch":
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        # Loggers write on global rank 0; the learning rates are the same on every rank.
        if not trainer.is_global_zero:
            return
        metrics = _learning_rates(trainer.optimizers, self._log_momentum)
        if metrics:
            trainer.log_metrics(metrics, step=trainer.global_step)
