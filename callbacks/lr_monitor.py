"""Log the learning rate (and optionally the momentum and weight decay) of every optimizer's parameter groups."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["LearningRateMonitor"]

_INTERVALS = (None, "step", "epoch")


def _group_suffixes(optimizer: torch.optim.Optimizer, prefix: str) -> list[str]:
    """Each parameter group's metric name: ``prefix`` alone for one unnamed group, else
    ``prefix/{name}`` (a group's ``"name"`` key) or ``prefix/pg{i}`` counted from 1."""
    groups = optimizer.param_groups
    labels = [group.get("name", f"pg{i}") for i, group in enumerate(groups, start=1)]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"LearningRateMonitor: the parameter groups of {prefix!r} repeat the names {repeated}: "
            "give each group of an optimizer its own 'name'"
        )
    if len(groups) == 1 and "name" not in groups[0]:
        return [prefix]
    return [f"{prefix}/{label}" for label in labels]


def _named_optimizers(trainer: Trainer) -> list[tuple[Any, torch.optim.Optimizer, list[str]]]:
    """``(scheduler config or None, optimizer, group names)``, Lightning's order and names: each
    scheduler's optimizer first (named by the config's ``name``, else ``lr-{Class}``), then the
    optimizers without a scheduler. The second and later optimizers of a class named by their class
    get ``-1``, ``-2``, ... (the first none)."""
    seen: list[torch.optim.Optimizer] = []
    counts: Counter[type] = Counter()

    def names(optimizer: torch.optim.Optimizer, prefix: str, counted: bool) -> list[str]:
        seen.append(optimizer)
        if counted:
            counts[type(optimizer)] += 1
        count = counts[type(optimizer)]
        return _group_suffixes(optimizer, f"{prefix}-{count - 1}" if count > 1 else prefix)

    named: list[tuple[Any, torch.optim.Optimizer, list[str]]] = []
    for config in trainer.lr_scheduler_configs:
        optimizer = getattr(config.scheduler, "optimizer", None)  # (a scheduler of one's own may have none)
        if not isinstance(optimizer, torch.optim.Optimizer):
            continue
        prefix = config.name if config.name is not None else f"lr-{type(optimizer).__name__}"
        named.append((config, optimizer, names(optimizer, prefix, config.name is None)))
    for optimizer in trainer.optimizers:
        if not any(optimizer is other for other in seen):
            named.append((None, optimizer, names(optimizer, f"lr-{type(optimizer).__name__}", True)))
    return named


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return "momentum" in optimizer.defaults or "betas" in optimizer.defaults


class LearningRateMonitor(Callback):
    """Log each parameter group's learning rate through the Trainer's loggers, under Lightning's names.

    Metric names are ``lr-{OptimizerClass}`` for an optimizer with one parameter group and
    ``lr-{OptimizerClass}/pg{i}`` (``i`` from 1; ``/{name}`` for a group with a ``"name"`` key) for
    several. A scheduler configured with a ``"name"`` names its optimizer's metrics instead. The
    second optimizer of a class gets ``-1``, the third ``-2``, ... With ``log_momentum`` the momentum
    (beta1 for Adam-style optimizers, 0 for those without) is logged as ``<lr name>-momentum``, with
    ``log_weight_decay`` the weight decay as ``<lr name>-weight_decay``.

    ``logging_interval`` is ``"step"`` (before the training batches after which the Trainer writes
    a row: ``trainer.logs_this_batch``), ``"epoch"`` (at the start of each epoch) or ``None``: each
    optimizer at its LR scheduler's own ``interval``, an optimizer without a scheduler at both. The
    values also go to ``trainer.callback_metrics`` (as tensors), and :attr:`lrs` keeps every value
    logged, by name.

    Example::

        trainer = Trainer(logger=CSVLogger("logs"), callbacks=[LearningRateMonitor("step")])
        trainer.fit(module, loader)  # logs "lr-AdamW" every log_every_n_steps batches
    """

    def __init__(
        self, logging_interval: str | None = None, log_momentum: bool = False, log_weight_decay: bool = False
    ) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is not supported. "
                f"Valid choices: {', '.join(map(repr, _INTERVALS))}"
            )
        self._interval = logging_interval
        self._log_momentum = log_momentum
        self._log_weight_decay = log_weight_decay
        #: every learning rate logged, by metric name (as Lightning's ``lrs``)
        self.lrs: dict[str, list[float]] = {}
        #: the last momentum and weight decay logged, by metric name (``None``: not logged yet), as Lightning's
        self.last_momentum_values: dict[str, float | None] = {}
        self.last_weight_decay_values: dict[str, float | None] = {}
        self._pending: dict[str, float] = {}  # sampled before a batch, written after it

    @property
    def logging_interval(self) -> str | None:
        return self._interval

    @property
    def log_momentum(self) -> bool:
        return self._log_momentum

    @property
    def log_weight_decay(self) -> bool:
        return self._log_weight_decay

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.loggers:
            raise RuntimeError(
                "LearningRateMonitor needs a logger to write to, but the Trainer has none. "
                "Pass one with Trainer(logger=...) or remove the LearningRateMonitor callback."
            )
        named = _named_optimizers(trainer)  # (also refuses repeated group names before training)
        if self._log_momentum and not all(_has_momentum(optimizer) for _, optimizer, _ in named):
            if trainer.is_global_zero:
                warnings.warn(
                    "LearningRateMonitor(log_momentum=True): some optimizers have no momentum; "
                    "their momentum is logged as 0",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.lrs = {name: [] for _, _, names in named for name in names}
        self.last_momentum_values = {f"{name}-momentum": None for name in self.lrs}
        self.last_weight_decay_values = {f"{name}-weight_decay": None for name in self.lrs}

    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        if self._interval == "epoch" and type(self) is LearningRateMonitor:  # (per epoch: no batch hook)
            return frozenset({"on_train_batch_start", "on_train_batch_end"})
        return frozenset()

    @override
    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if self._interval == "epoch":
            return
        # The batches after which the Trainer writes a row, as Lightning's: the rates this batch
        # steps with, written after it, at the step of its loss.
        if trainer.logs_this_batch:
            self._pending = self._log(trainer, "step", write=False)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending:
            if trainer.is_global_zero:
                trainer.log_metrics(self._pending, step=trainer.global_step)
            self._pending = {}

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._interval != "step":
            self._log(trainer, "epoch")

    def _log(self, trainer: Trainer, interval: str, write: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for config, optimizer, names in _named_optimizers(trainer):
            if self._interval is None and config is not None and config.interval != interval:
                continue
            metrics.update(self._statistics(optimizer, names))
        if not metrics:
            return metrics
        # The same on every rank: each process's callback metrics get them, its loggers (rank 0's) too.
        device = trainer.accelerator.device
        trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in metrics.items()})
        if write and trainer.is_global_zero:
            trainer.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def _statistics(self, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, float]:
        betas = "betas" in optimizer.defaults
        metrics: dict[str, float] = {}
        for name, group in zip(names, optimizer.param_groups, strict=True):
            # A group added during the fit (BaseFinetuning): the first group's history so far, logged
            # under the optimizer's name alone, goes on under ".../pg1", as Lightning's.
            alone = name.removesuffix("/pg1")
            if alone != name and alone in self.lrs and name not in self.lrs:
                self.lrs[name] = self.lrs.pop(alone)
            # float() also covers a tensor learning rate (e.g. Adam(lr=torch.tensor(1e-3))).
            metrics[name] = float(group["lr"])
            self.lrs.setdefault(name, []).append(metrics[name])
            if self._log_momentum:
                key = f"{name}-momentum"
                metrics[key] = float(group["betas"][0] if betas else group.get("momentum", 0.0))
                self.last_momentum_values[key] = metrics[key]
            if self._log_weight_decay:
                key = f"{name}-weight_decay"
                metrics[key] = self.last_weight_decay_values[key] = float(group.get("weight_decay", 0.0))
        return metrics
