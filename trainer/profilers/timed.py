"""The profiled path of the loops, chosen once: each function here returns the call it is given
unchanged when there is no profiler, else that call wrapped in ``profiler.start``/``stop``.

The Trainer asks when it resolves its hooks (:class:`~ember.trainer.hooks.HookPlan`, at each stage
and training epoch start), when an epoch starts (:class:`~ember.trainer.step.Epoch`: the steps,
the optimizer's step and ``zero_grad``) and when a loop starts (its batches and its ``*_step``).
Without a profiler the loops therefore run the very callables they ran before profiling existed:
no test, no extra call per batch (docs/benchmarks.md, "Where the Trainer's step time goes").

The action names are Lightning's, with ember's class names: ``[Callback]{state_key}.{hook}``,
``[TrainModule]{class}.{hook}`` (Lightning: ``[LightningModule]``), ``[Strategy]{class}.{step}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ember.trainer.profilers.base import Profiler
    from ember.trainer.step import Epoch
    from ember.trainer.trainer import Trainer

__all__ = [
    "TRAIN_BATCH",
    "TRAIN_EPOCH",
    "backward_call",
    "callback_action",
    "end_stage",
    "fetch_action",
    "module_action",
    "module_hook",
    "profiled_epoch",
    "start_stage",
    "strategy_action",
    "timed",
    "timed_batches",
]

F = TypeVar("F", bound=Callable[..., Any])

TRAIN_EPOCH = "run_training_epoch"  # the training batches of an epoch (and the validation inside it)
TRAIN_BATCH = "run_training_batch"  # training_step, backward and the optimizer step of one batch
# Lightning's names for getting the next batch: its loops' classes, kept so that reports compare.
_FETCH = {
    "train": "[_TrainingEpochLoop].train_dataloader_next",
    "validation": "[_EvaluationLoop].val_next",
    "test": "[_EvaluationLoop].test_next",
    "predict": "[_PredictionLoop].predict_next",
}


def timed(profiler: Profiler | None, action: str, function: F) -> F:
    """``function`` itself without a profiler, else a function that runs it as ``action``."""
    if profiler is None:
        return function
    start, stop = profiler.start, profiler.stop

    def profiled(*args: Any, **kwargs: Any) -> Any:
        start(action)
        try:
            return function(*args, **kwargs)
        finally:
            stop(action)

    profiled.__wrapped__ = function  # type: ignore[attr-defined]
    profiled.action = action  # type: ignore[attr-defined]
    return profiled  # type: ignore[return-value]


def timed_batches(profiler: Profiler | None, action: str, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` itself without a profiler, else its batches with each ``next()`` run as ``action``."""
    return batches if profiler is None else _timed_batches(profiler, action, batches)


def _timed_batches(profiler: Profiler, action: str, batches: Iterator[Any]) -> Iterator[Any]:
    while True:
        profiler.start(action)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            profiler.stop(action)
        yield batch


def fetch_action(loop: str) -> str:
    """The action of getting the next batch in ``loop`` (``"train"``, ``"validation"``, ``"test"``,
    ``"predict"``)."""
    return _FETCH[loop]


def callback_action(callback: Any, hook: str) -> str:
    """``[Callback]{state_key}.{hook}``: a callback's hook, as Lightning names it."""
    return f"[Callback]{callback.state_key}.{hook}"


def module_action(module: Any, hook: str, kind: str = "TrainModule") -> str:
    """``[TrainModule]{class}.{hook}`` (``kind="DataModule"``: a DataModule's hook)."""
    return f"[{kind}]{type(module).__name__}.{hook}"


def strategy_action(trainer: Trainer, step: str) -> str:
    """``[Strategy]{class}.{step}``: a step (``training_step``, ``backward`` ...) run through the
    strategy's wrapper and the precision plugin, as Lightning names it."""
    return f"[Strategy]{type(trainer.strategy).__name__}.{step}"


def module_hook(trainer: Trainer, name: str) -> Callable[..., Any]:
    """The trainer's ``module.<name>`` (``configure_model`` ...), timed under a profiler."""
    method: Callable[..., Any] = getattr(trainer.module, name)
    profiler = trainer.config.profiler
    return method if profiler is None else timed(profiler, module_action(trainer.module, name), method)


def backward_call(trainer: Trainer) -> Callable[..., Any]:
    """``trainer.accelerator.backward`` (or, for a module that overrides ``backward``, the strategy's
    backward around it: ``step.module_backward``), timed as ``[Strategy]{class}.backward`` under a
    profiler. Asked when a stage attaches its module."""
    from ember.trainer.hooks import overridden  # (here: hooks imports this module)
    from ember.trainer.step import module_backward

    module = getattr(trainer, "_module", None)  # (None in the Trainer's __init__)
    own = overridden(module, "backward") if module is not None else None
    backward = trainer.accelerator.backward if own is None else module_backward(trainer, own)
    profiler = trainer.config.profiler
    return backward if profiler is None else timed(profiler, strategy_action(trainer, "backward"), backward)


def start_stage(trainer: Trainer, stage: str) -> None:
    """A stage starts: the profiler's :meth:`~Profiler.setup` (its report covers this stage), with
    the process's global rank (None with one process) and the trainer's ``log_dir``."""
    profiler = trainer.config.profiler
    if profiler is not None:
        profiler.setup(stage, trainer.global_rank if trainer.world_size > 1 else None, trainer.log_dir)


def end_stage(trainer: Trainer, stage: str, failed: bool) -> None:
    """A stage ended: the profiler's report (:meth:`~Profiler.describe`), or, after an error, only
    its :meth:`~Profiler.teardown`, as Lightning does."""
    profiler = trainer.config.profiler
    if profiler is not None and failed:
        profiler.teardown(stage)
    elif profiler is not None:
        profiler.describe()


def profiled_epoch(profiler: Profiler, epoch: Epoch, trainer: Trainer) -> Epoch:
    """``epoch`` with its per-batch calls timed: ``run_batch`` (``run_training_batch``),
    ``training_step``, the optimizer's step and ``zero_grad`` (as the module's ``optimizer_step``
    and ``optimizer_zero_grad``, which Lightning reports whether overridden or not; with ember's
    defaults ``training_step`` and backward are not inside ``optimizer_step``) and the module's
    ``configure_gradient_clipping`` where it overrides it."""
    module = trainer.module
    step, zero_grad = module_action(module, "optimizer_step"), module_action(module, "optimizer_zero_grad")

    def wrap(action: str, function: Any) -> Any:
        return None if function is None else timed(profiler, action, function)

    return dataclasses.replace(
        epoch,
        run_batch=timed(profiler, TRAIN_BATCH, epoch.run_batch),
        training_step=timed(profiler, strategy_action(trainer, "training_step"), epoch.training_step),
        step=wrap(step, epoch.step),
        zero_grad=wrap(zero_grad, epoch.zero_grad),
        module_step=wrap(step, epoch.module_step),
        module_zero_grad=wrap(zero_grad, epoch.module_zero_grad),
        module_clip=wrap(module_action(module, "configure_gradient_clipping"), epoch.module_clip),
    )
