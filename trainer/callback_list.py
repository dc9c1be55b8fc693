"""The Trainer's callback list: the user's, the defaults its flags ask for, the module's
``configure_callbacks`` merged in, each checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["check_callbacks", "default_callbacks", "merge_callbacks"]


def default_callbacks(trainer: Trainer, callbacks: list[Callback]) -> list[Callback]:
    """The user's callbacks plus the defaults the Trainer's flags ask for."""
    from ember.callbacks.model_checkpoint import ModelCheckpoint
    from ember.callbacks.model_summary import ModelSummary
    from ember.callbacks.nan_guard import NonFiniteGuard
    from ember.callbacks.progress import RichProgressBar
    from ember.callbacks.run_summary import RunSummary
    from ember.callbacks.timer import Timer

    config = trainer.config
    result = check_callbacks(callbacks)
    kinds = {type(c) for c in result}
    has = lambda cls: any(issubclass(k, cls) for k in kinds)  # noqa: E731
    if has(ModelCheckpoint) and not config.enable_checkpointing:
        raise ValueError("a ModelCheckpoint callback was given, but enable_checkpointing=False")
    if config.enable_checkpointing and not config.fast_dev_run and not has(ModelCheckpoint):
        result.append(ModelCheckpoint())
    bars = [type(c).__name__ for c in result if c.progress_bar]
    if bars and not config.enable_progress_bar:  # (Lightning raises MisconfigurationException)
        off = "barebones=True (the bar is off)" if config.barebones else "enable_progress_bar=False"
        raise ValueError(f"a progress bar callback ({bars[0]}) was given, but {off}: drop one of them")
    if config.enable_progress_bar and not bars:
        result.append(RichProgressBar())
    if config.enable_progress_bar and not has(RunSummary):
        result.append(RunSummary())
    if config.enable_model_summary and not config.fast_dev_run and not has(ModelSummary):
        result.append(ModelSummary())
    if config.duration is not None and not has(Timer):
        result.append(Timer(duration=config.duration, interval="step"))
    if config.non_finite is not None and not has(NonFiniteGuard):
        result.append(NonFiniteGuard(mode=config.non_finite))
    return check_callbacks(result)


def merge_callbacks(trainer_callbacks: list[Callback], module_callbacks: list[Any]) -> list[Callback]:
    """The Trainer's callbacks, then the module's (``configure_callbacks``). A module callback
    replaces the Trainer's of its class or of a class it derives from, as in Lightning: a
    ``ModelCheckpoint(monitor=...)`` from the module replaces the default one; a progress bar of
    either kind replaces the Trainer's bar."""
    replaced = {
        type(mine)
        for mine in trainer_callbacks
        if type(mine) is not Callback and any(isinstance(theirs, type(mine)) for theirs in module_callbacks)
    }
    bar = any(
        getattr(theirs, "progress_bar", False) for theirs in module_callbacks
    )  # any bar replaces the bar
    return [c for c in trainer_callbacks if type(c) not in replaced and not (bar and c.progress_bar)] + list(
        module_callbacks
    )


def check_callbacks(callbacks: list[Any]) -> list[Callback]:
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be ember.callbacks.Callback instances, got {type(callback).__name__}"
            )
    keys = [c.state_key for c in callbacks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"callbacks with the same state_key {duplicates}: give them different arguments")
    return list(callbacks)
