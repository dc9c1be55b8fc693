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


def _learning_rates(
    optimizers: Sequence[torch.optim.Optimizer], log_momentum: bool, chosen: set[int] | None = None
) -> dict[str, float]:
    """The metrics of the optimizers whose ``id`` is in ``chosen`` (None: all), named among all of them."""
    metrics: dict[str, float] = {}
    for prefix, optimizer in zip(_optimizer_prefixes(optimizers), optimizers, strict=True):
        if chosen is not None and id(optimizer) not in chosen:
            continue
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
    (at the start of each epoch) or ``None``: each optimizer at its LR scheduler's own ``interval``
    (a scheduler stepped per epoch: at the start of each epoch; per step: every
    ``log_every_n_steps`` batches), an optimizer without a scheduler at both. The values also go to
    ``trainer.callback_metrics`` (as tensors), where callbacks such as ``EarlyStopping`` can read them.

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
            self._log(trainer, "step")

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._interval != "step":
            self._log(trainer, "epoch")

    def _log(self, trainer: Trainer, interval: str) -> None:
        chosen = None if self._interval is not None else _optimizers_at(trainer, interval)
        metrics = _learning_rates(trainer.optimizers, self._log_momentum, chosen)
        if not metrics:
            return
        # The same on every rank: each process's callback metrics get them, its loggers (rank 0's) too.
        device = trainer.accelerator.device
        trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in metrics.items()})
        if trainer.is_global_zero:
            trainer.log_metrics(metrics, step=trainer.global_step)


def _optimizers_at(trainer: Trainer, interval: str) -> set[int]:
    """``id`` of each optimizer to log at ``interval`` under ``logging_interval=None``: those with a
    scheduler of that interval, and those without a scheduler."""
    optimizers = trainer.optimizers
    scheduled: dict[int, set[str]] = {}
    for config in trainer.lr_scheduler_configs:
        owner = getattr(config.scheduler, "optimizer", None)
        scheduled.setdefault(id(owner), set()).add(config.interval)
    return {id(o) for o in optimizers if id(o) not in scheduled or interval in scheduled[id(o)]}
