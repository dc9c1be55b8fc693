"""Turn whatever ``configure_optimizers()`` returned into optimizers and scheduler configs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ember.trainer.hooks import call_hook

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["LRSchedulerConfig", "count_manual_steps", "parse_optimizers", "step_schedulers"]

_INTERVALS = ("step", "epoch")
_SCHEDULER_KEYS = {"scheduler", "interval", "frequency", "monitor", "name", "strict"}


@dataclass(kw_only=True, slots=True)
class LRSchedulerConfig:
    """How the Trainer steps one LR scheduler."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    name: str | None = None
    strict: bool = True

    @property
    def is_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)

    @property
    def takes_metric(self) -> bool:
        """Stepped with the monitored value: ReduceLROnPlateau, or a scheduler that is not torch's
        (driven by the module's ``lr_scheduler_step``) given a ``monitor``."""
        return self.is_plateau or (self.monitor is not None and not isinstance(self.scheduler, LRScheduler))


def _scheduler_config(item: Any, custom_step: bool) -> LRSchedulerConfig:
    if isinstance(item, Mapping):
        unknown = set(item) - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(
                f"configure_optimizers(): unknown lr_scheduler keys {sorted(unknown)}; valid keys: {sorted(_SCHEDULER_KEYS)}"
            )
        if "scheduler" not in item:
            raise ValueError('configure_optimizers(): the lr_scheduler dict needs a "scheduler" entry')
        config = LRSchedulerConfig(**dict(item))
    else:
        config = LRSchedulerConfig(scheduler=item)
    name = type(config.scheduler).__name__
    if not isinstance(config.scheduler, (LRScheduler, ReduceLROnPlateau)):
        if not custom_step:
            raise TypeError(
                f"configure_optimizers(): {name} is not a torch LR scheduler (torch.optim.lr_scheduler."
                "LRScheduler or ReduceLROnPlateau); to use another kind (timm's), override the module's "
                "lr_scheduler_step(scheduler, metric) to step it"
            )
        if not all(callable(getattr(config.scheduler, m, None)) for m in ("state_dict", "load_state_dict")):
            raise TypeError(
                f"configure_optimizers(): the scheduler {name} needs state_dict() and load_state_dict(), "
                "for checkpoints to hold it"
            )
    if config.interval not in _INTERVALS:
        raise ValueError(
            f"lr_scheduler interval={config.interval!r} is not valid. Valid choices: 'step', 'epoch'"
        )
    if isinstance(config.frequency, bool) or not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"lr_scheduler frequency={config.frequency!r} must be an int >= 1")
    if config.is_plateau and config.monitor is None:
        raise ValueError(
            'configure_optimizers(): ReduceLROnPlateau needs a metric to watch: return {"optimizer": opt, '
            '"lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}'
        )
    return config


def parse_optimizers(
    result: Any, custom_step: bool = False
) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Accepts an optimizer; a list of optimizers; ``(optimizers, schedulers)``; a dict with
    ``"optimizer"`` and optional ``"lr_scheduler"`` (a scheduler or a config dict); a list of such dicts.
    ``custom_step``: the module overrides ``lr_scheduler_step``, so any scheduler kind is accepted."""
    optimizers: list[Any]
    schedulers: list[Any] = []
    if isinstance(result, torch.optim.Optimizer):
        optimizers = [result]
    elif isinstance(result, Mapping):
        if "optimizer" not in result:
            raise ValueError('configure_optimizers() returned a dict without an "optimizer" key')
        optimizers = [result["optimizer"]]
        if result.get("lr_scheduler") is not None:
            schedulers = [result["lr_scheduler"]]
        if "monitor" in result and schedulers and not isinstance(schedulers[0], Mapping):
            schedulers = [{"scheduler": schedulers[0], "monitor": result["monitor"]}]
    elif isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Sequence) for r in result):
        optimizers, schedulers = list(result[0]), list(result[1])
    elif isinstance(result, Sequence) and result and all(isinstance(r, Mapping) for r in result):
        optimizers, schedulers = [], []
        for entry in result:
            opts, scheds = parse_optimizers(entry, custom_step)
            optimizers += opts
            schedulers += scheds
        return optimizers, schedulers  # type: ignore[return-value]
    elif (
        isinstance(result, Sequence) and result and all(isinstance(r, torch.optim.Optimizer) for r in result)
    ):
        optimizers = list(result)
    else:
        raise TypeError(
            f"configure_optimizers() returned {type(result).__name__}; return an optimizer, (optimizers, schedulers), "
            'or {"optimizer": ..., "lr_scheduler": ...}'
        )
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"configure_optimizers(): {type(opt).__name__} is not a torch.optim.Optimizer")
    return optimizers, [_scheduler_config(s, custom_step) for s in schedulers]


def step_schedulers(
    configs: list[LRSchedulerConfig],
    interval: str,
    count: int,
    metrics: dict[str, Any],
    step: Callable[[Any, Any], Any] | None = None,
    metric: bool | None = None,
) -> None:
    """Step the schedulers of ``interval`` whose ``frequency`` divides ``count`` (steps or epochs done);
    ``step``: the module's ``lr_scheduler_step(scheduler, metric)`` when it overrides it; ``metric``:
    only those that take a metric (True) or only the others (False)."""
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if metric is not None and config.takes_metric is not metric:
            continue
        metric = None
        if config.takes_metric:
            assert config.monitor is not None
            if config.monitor not in metrics:
                if not config.strict:
                    continue
                raise KeyError(
                    f"{type(config.scheduler).__name__} monitors {config.monitor!r}, which was not logged. "
                    f"Logged metrics: {sorted(metrics)}"
                )
            metric = metrics[config.monitor]
        if step is not None:
            step(config.scheduler, metric)
        elif metric is None:
            config.scheduler.step()
        else:
            config.scheduler.step(metric)


def count_manual_steps(trainer: Trainer) -> list[Any]:
    """Manual optimisation, as Lightning's: each ``step()`` of a prepared optimizer is a global step,
    also one the grad scaler skips (inf/NaN gradients, ``16-mixed``), with ``on_before_optimizer_step``
    before it: after each call of the step's closure (its backward pass) where it has one, once the
    gradients are unscaled. Returns the handles that take the hooks off."""
    accelerator = trainer.accelerator

    def hooks(prepared: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        def before() -> None:
            accelerator.unscale_gradients(prepared)  # (nothing to do without a grad scaler)
            call_hook(trainer, "on_before_optimizer_step", prepared.optimizer)

        def after() -> None:
            trainer.state.global_step += 1

        return before, after

    return [prepared._add_step_hooks(*hooks(prepared)) for prepared in trainer._step_optimizers]
