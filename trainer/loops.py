"""The loops: fit and evaluation (validate / test / sanity check); predict is in ``predict_loop``.
They read top to bottom; the hook order they follow is the contract written in docs/concepts/hooks.md."""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Generator
from contextlib import AbstractContextManager, closing
from typing import TYPE_CHECKING, Any

import torch

from ember._rng import rng_state, set_rng_state
from ember.trainer.hooks import call_hook, run_hook, run_step, step_call
from ember.trainer.module_mode import enter_eval, leave_eval
from ember.trainer.profilers.timed import TRAIN_EPOCH, fetch_action, module_hook, timed, timed_batches
from ember.trainer.schedule import may_stop, validate_at_epoch_end, validate_mid_epoch, validation_epoch
from ember.trainer.step import Epoch, batch_outputs

if TYPE_CHECKING:
    from ember.data import PreparedDataLoader
    from ember.trainer.logging import MetricStore
    from ember.trainer.profilers import Profiler
    from ember.trainer.trainer import Trainer

__all__ = ["run_evaluation", "run_fit"]


# -- fit ---------------------------------------------------------------------------------------------
def run_fit(trainer: Trainer) -> None:
    state = trainer.state
    trainer._in_batch = False  # (left set by a batch that raised in an earlier fit)
    call_hook(trainer, "on_fit_start")
    # (as Lightning: no sanity check when it would run no batch, limit_val_batches=0)
    if not trainer._resumed and any(limit > 0 for limit in trainer._sanity_limits()):
        # As Lightning's: the random streams are put back afterwards, so that the fit draws (shuffles,
        # drops out) the same with or without a sanity check.
        streams = rng_state(xla=trainer.strategy.accelerator == "xla")
        trainer.sanity_checking = True
        call_hook(trainer, "on_sanity_check_start")
        run_evaluation(trainer, "validation", trainer._val_loaders, trainer._sanity_limits())
        call_hook(trainer, "on_sanity_check_end")
        trainer.sanity_checking = False
        # As Lightning: the sanity check's values are gone, from the progress bar too (it converted them).
        trainer._metrics.clear()
        trainer._progress_bar_stale = True
        set_rng_state(streams)
    if state.epoch_done:  # a checkpoint from the end of an epoch: the loop would start with the next
        state.next_epoch()
    # (resumed from a checkpoint at max_epochs / max_steps, limits of 0, or no training batches:
    # limit_train_batches=0 or an empty loader)
    if _fit_done(trainer) or trainer.num_training_batches == 0:
        # As Lightning: no training, so no on_train_start / on_train_end; the fit ends, with a note.
        _report_nothing_to_train(trainer)
        call_hook(trainer, "on_fit_end")
        return
    _warn_sparse_rows(trainer)
    if trainer._val_clock is not None:  # (as Lightning: after the sanity check, anew on resume)
        trainer._val_clock.start()
    call_hook(trainer, "on_train_start")
    while not _fit_done(trainer):
        if not state.train_done:
            timed(trainer.config.profiler, TRAIN_EPOCH, _train_epoch)(trainer)
            state.train_done = True
        if not state.val_done:
            if validate_at_epoch_end(trainer):
                module_hook(trainer, "on_validation_model_zero_grad")()  # (an epoch ends on a step)
                run_evaluation(
                    trainer, "validation", trainer._val_loaders, trainer._val_limits(), at_epoch_end=True
                )
            state.val_done = True
        if not state.epoch_done:
            _end_epoch(trainer)
            # A boundary too: a checkpoint saved here resumes at the next epoch.
            trainer._preemption.stop_if_signalled(trainer)
        state.next_epoch()
    call_hook(trainer, "on_train_end")
    call_hook(trainer, "on_fit_end")


def _fit_done(trainer: Trainer) -> bool:
    config, state = trainer.config, trainer.state
    if trainer.should_stop and may_stop(trainer):
        return True
    if config.max_steps != -1 and state.global_step >= config.max_steps:
        return True
    return config.max_epochs is not None and config.max_epochs != -1 and state.epoch >= config.max_epochs


def _report_nothing_to_train(trainer: Trainer) -> None:
    config, state = trainer.config, trainer.state
    if config.max_steps != -1 and state.global_step >= config.max_steps:
        why = f"max_steps={config.max_steps} is reached; raise it to train further"
    elif config.max_epochs is not None and config.max_epochs != -1 and state.epoch >= config.max_epochs:
        why = f"max_epochs={config.max_epochs} is reached; raise it to train further"
    elif trainer.num_training_batches == 0:
        limit = config.limit_train_batches
        why = (
            f"limit_train_batches={limit!r} leaves no training batch"
            if not limit
            else "the training loader is empty"
        )
    else:
        why = "trainer.should_stop was set before the first epoch"
    if trainer.is_global_zero:
        where = "the checkpoint is" if trainer._resumed else "the fit starts"
        print(f"ember: fit trained nothing: {where} at epoch {state.epoch}, step {state.global_step}, and {why}",
              file=sys.stderr, flush=True)  # fmt: skip


def _warn_sparse_rows(trainer: Trainer) -> None:
    """As Lightning (the same condition): an epoch shorter than ``log_every_n_steps`` may write no row
    of step values, which looks like a logger that records nothing."""
    batches, every = trainer.num_training_batches, trainer.config.log_every_n_steps
    if trainer.loggers and batches < every and not trainer.config.fast_dev_run and trainer.is_global_zero:
        warnings.warn(
            f"the training epoch has {batches} batches, fewer than log_every_n_steps={every}: an epoch may end "
            "without a logger row of step values; lower log_every_n_steps to see them in each epoch",
            stacklevel=4,
        )


def _train_epoch(trainer: Trainer) -> None:
    state, config = trainer.state, trainer.config
    reload = config.reload_dataloaders_every_n_epochs
    if state.batch_idx == 0 and reload and state.epoch > 0 and state.epoch % reload == 0:
        trainer._reload_loaders()
    loader = trainer._train_loader
    assert loader is not None
    if state.batch_idx == 0:  # a fresh epoch; a resumed one continues where its loader stopped
        loader.set_epoch(state.epoch)
        trainer._metrics.reset()
        call_hook(trainer, "on_train_epoch_start")
        if trainer.should_stop and may_stop(trainer):  # (as Lightning: asked before each batch)
            return
    # After on_train_epoch_start (a finetuning callback unfreezes there) and after a resume: a
    # changed set of trainable parameters gets a new DDP wrapper before Epoch caches the model.
    trainer._refresh_trainable()
    trainer._hook_plan.refresh()  # callbacks' inactive hooks, as their settings are now
    epoch = Epoch.of(trainer, validates=bool(trainer._val_loaders) and validation_epoch(trainer))
    if epoch.in_sync:
        trainer.accelerator.accumulate(epoch.model, sync=True)  # stays so: no batch enters accumulate()
    batches = iter(loader)
    store, previous = trainer._metrics, trainer._metrics.fx  # (each batch sets its name: _train_batch)
    try:
        # islice stops at the limit without asking the loader for one more batch
        source = timed_batches(trainer.config.profiler, fetch_action("train"), batches)  # (chosen once)
        todo = itertools.islice(source, max(0, int(epoch.limit) - state.batch_idx)) if epoch.sized else source
        for batch in todo:
            if _train_batch(trainer, epoch, batch) or (trainer.should_stop and may_stop(trainer)):
                break
            # (the setting, not a copy: fit_loop.epoch_loop.max_steps may lower it mid-epoch, as Lightning's)
            if config.max_steps != -1 and state.global_step >= config.max_steps:
                break
    except BaseException:
        # The epoch ends in an exception: its pass closed, the loader points back at the first batch
        # not finished, so that a checkpoint saved now (OnExceptionCheckpoint) runs it again on resume.
        batches.close()  # type: ignore[attr-defined]
        loader.load_state_dict({**loader.state_dict(), "epoch": state.epoch, "position": state.batch_idx})
        raise
    finally:
        store.fx = previous
        batches.close()  # type: ignore[attr-defined]


def _train_batch(trainer: Trainer, epoch: Epoch, batch: Any) -> bool:
    """One training batch, hooks included; True: ``on_train_batch_start`` returned -1 (end the epoch).

    The one function every batch runs, flat: the epoch's answers are in ``epoch``, the hooks
    resolved in the trainer's :class:`~ember.trainer.hooks.HookPlan`. At small steps every Python
    call here costs about half a microsecond (cold caches between the kernels):
    benchmarks/step_overhead.py measures it against a hand-written loop.
    """
    state, store, accelerator = epoch.state, epoch.store, epoch.accelerator
    hooks = trainer._hook_plan.entries(trainer)
    batch_idx = state.batch_idx
    store.begin_batch(batch)
    # Every hook a training batch runs is a step hook, where self.log's defaults are those of
    # training_step: the batch runs under that one name (a hook that needs its own, like
    # on_train_batch_start, and validation set theirs and put this one back), not one per call.
    store.fx = "training_step"
    is_last = batch_idx + 1 >= epoch.limit if epoch.sized else accelerator.end_of_dataloader
    # (manual optimisation: the module steps its optimizers itself; every batch counts as a step)
    should_step = epoch.in_sync or not epoch.automatic or is_last or (batch_idx + 1) % epoch.accumulate == 0
    # As Lightning's: a logger row every log_every-th batch that steps (trainer.logs_this_batch)
    row = should_step and (state.stepped_batches + 1) % epoch.log_every == 0
    trainer._stepping, trainer._row_due, trainer._is_last_batch = should_step, row, is_last
    entry = hooks["on_train_batch_start"]
    if entry is not None and run_hook(store, "on_train_batch_start", entry, batch, batch_idx) == -1:
        return True
    # _in_batch: training_step and the hooks around its backward and step run (the counters advance
    # after them; Lightning's loop views read this: trainer/loop_views.py; an exception leaves it set
    # for on_exception, run_fit clears it)
    trainer._in_batch = True
    if epoch.in_sync:  # gradients stay in sync (_train_epoch)
        output = epoch.run_batch(trainer, epoch, hooks, batch, batch_idx, True)
    else:
        with accelerator.accumulate(epoch.model, sync=should_step):
            output = epoch.run_batch(trainer, epoch, hooks, batch, batch_idx, should_step)
    state.batch_idx += 1
    state.total_batch_idx += 1
    trainer._in_batch = False
    if should_step:
        state.stepped_batches += 1
        if row:  # the bar, drawn in on_train_batch_end, shows the values of the row written after it
            trainer._progress_bar_stale = trainer._row_pending = True
    entry = hooks["on_train_batch_end"]
    if entry is not None:  # (its parts in order: HookPlan's Entry)
        outputs = batch_outputs(store, output, epoch.accumulate if epoch.automatic else 1)
        for hook in entry[3]:
            hook(outputs, batch, batch_idx)
    # After on_train_batch_end, as Lightning's: what it logs is in the row.
    if row:
        trainer._flush_row()  # (unless a checkpoint saved in the hook wrote it)
    elif should_step and trainer.should_stop:
        trainer._write_row(store.step_values)
    # Freed now, where no hook can see it (Epoch.frees): not when the fit may end here, so that the
    # gradients of a fit's last step stay, as Lightning's.
    if epoch.frees and should_step and not is_last and not trainer.should_stop:
        max_steps = trainer.config.max_steps  # (the setting: fit_loop.epoch_loop.max_steps may change it)
        if max_steps == -1 or state.global_step < max_steps:
            epoch.zero_grad()
            epoch.freed = True
    if epoch.validates and validate_mid_epoch(trainer, batch_idx, is_last):
        if should_step:  # (as Lightning: not in the middle of an accumulation window)
            module_hook(trainer, "on_validation_model_zero_grad")()
        run_evaluation(trainer, "validation", trainer._val_loaders, trainer._val_limits())
    # A step boundary: no gradients are pending and the validation due after this batch has run, so
    # a checkpoint here resumes exactly with the next batch. A pre-emption stops here.
    if should_step and (epoch.several or epoch.signals.received is not None):
        trainer._preemption.stop_if_signalled(trainer)
    return False


def _end_epoch(trainer: Trainer) -> None:
    store = trainer._metrics
    store.finish_epoch()
    call_hook(trainer, "on_train_epoch_end", part="first")
    trainer._write_row(store.take_epoch_row())
    # The epoch's schedulers that take a metric (ReduceLROnPlateau), on what the epoch logged; the
    # others stepped after its last batch (trainer/step.py, _after_step), as Lightning's.
    trainer._step_schedulers("epoch", metric=True)
    trainer.state.epoch_done = True  # a checkpoint from here on resumes at the next epoch
    call_hook(trainer, "on_train_epoch_end", part="monitoring")
    store.reset_spent()  # the epoch's torchmetrics metrics, after its end hooks (as Lightning's)


def _limited(
    loader: PreparedDataLoader, limit: int | float, profiler: Profiler | None = None, action: str = ""
) -> Generator[tuple[int, Any], None, None]:
    """``(batch_idx, batch)`` for at most ``limit`` batches; the loader's pass is closed when we stop
    early. With a profiler each ``next()`` is timed as ``action``."""
    batches = iter(loader)
    source = timed_batches(profiler, action, batches)
    try:
        for batch_idx in itertools.count():
            if batch_idx >= limit:
                return
            try:
                batch = next(source)
            except StopIteration:
                return
            yield batch_idx, batch
    finally:
        batches.close()  # type: ignore[attr-defined]


# -- evaluation ------------------------------------------------------------------------------------
def run_evaluation(
    trainer: Trainer,
    prefix: str,
    loaders: list[PreparedDataLoader],
    limits: list[int | float],
    at_epoch_end: bool = False,
) -> list[dict[str, float]]:
    """One pass over the validation (``prefix="validation"``) or test loaders; returns metrics per loader."""
    outer, trainer._evaluation = trainer._evaluation, prefix  # (trainer.validating / testing)
    try:
        return _evaluation_pass(trainer, prefix, loaders, limits, at_epoch_end)
    finally:
        trainer._evaluation = outer


def _evaluation_pass(
    trainer: Trainer,
    prefix: str,
    loaders: list[PreparedDataLoader],
    limits: list[int | float],
    at_epoch_end: bool,
) -> list[dict[str, float]]:
    store = trainer._metrics
    store.loader_of.clear()
    store.park()  # keep the training epoch's aggregates aside
    modes = enter_eval(trainer, prefix)  # on_{prefix}_model_eval: the model's eval()
    trainer._pass_batches = 0  # (the pass's finished batches, for Lightning's loop views)
    call_hook(trainer, f"on_{prefix}_start")
    call_hook(trainer, f"on_{prefix}_epoch_start")
    several = len(loaders) > 1
    name, profiler, accelerator, model = (
        f"{prefix}_step",
        trainer.config.profiler,
        trainer.accelerator,
        trainer.model,
    )
    # The module's step, resolved (and timed under a profiler) once; with several loaders it must
    # take dataloader_idx (step_method raises before the first batch).
    step = step_call(trainer, name, len(loaders))
    seen = store.eval_steps(prefix, loaders) if not trainer.sanity_checking else None  # (row steps)
    with _evaluating(trainer):
        for loader_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            store.dataloader_suffix = f"/dataloader_idx_{loader_idx}" if several else ""
            last_loader = loader_idx == len(loaders) - 1
            with closing(_limited(loader, limit, profiler, fetch_action(prefix))) as batches:
                for batch_idx, batch in batches:
                    store.begin_batch(batch)
                    trainer._pass_last = last_loader and last_batch(trainer, limit, batch_idx)
                    extra = (loader_idx,) if several else ()
                    call_hook(trainer, f"on_{prefix}_batch_start", batch, batch_idx, loader_idx)
                    output = run_step(store, accelerator, model, name, step, batch, batch_idx, *extra)
                    call_hook(trainer, f"on_{prefix}_batch_end", output, batch, batch_idx, loader_idx)
                    trainer._pass_batches += 1
                    if seen is not None:  # values logged with on_step=True: a row after each batch
                        if store.step_values:
                            trainer._write_row(store.step_values, step=seen[loader_idx])
                        seen[loader_idx] += 1
            if several:
                store.end_loader()
        store.dataloader_suffix = ""
    store.finish_epoch()
    call_hook(trainer, f"on_{prefix}_epoch_end")
    store.reset_spent()  # (after the hook, which may still compute() them, as in Lightning)
    row = store.take_epoch_row()
    if not trainer.sanity_checking:
        trainer._write_row(row)
    if at_epoch_end:
        trainer.state.val_done = True  # a checkpoint saved in on_validation_end resumes after this run
    call_hook(trainer, f"on_{prefix}_end")
    store.unpark()
    leave_eval(trainer, prefix, modes)  # on_{prefix}_model_train, or each layer's mode as it was
    if trainer._val_clock is not None and prefix == "validation":  # the next interval starts now
        trainer._val_clock.restart()
    values = {key: float(value) for key, value in row.items()}
    return [{k: v for k, v in values.items() if _of_loader(store, k, i)} for i in range(len(loaders))]


def _of_loader(store: MetricStore, key: str, index: int) -> bool:
    """Whether ``key`` belongs in loader ``index``'s results: its suffix, or the loader that logged it
    without one (``add_dataloader_idx=False``); a value logged outside the steps belongs to all."""
    suffix = f"/dataloader_idx_{index}"
    if "/dataloader_idx_" in key:
        return key.endswith(suffix)
    return store.loader_of.get(key, suffix) == suffix


def last_batch(trainer: Trainer, limit: int | float, batch_idx: int) -> bool:
    """Whether batch ``batch_idx`` of an evaluation loader is its last (``limit``: its batches)."""
    return batch_idx + 1 >= limit if limit != float("inf") else trainer.accelerator.end_of_dataloader


def _evaluating(trainer: Trainer) -> AbstractContextManager[Any]:
    """Evaluation's grad mode: ``torch.inference_mode()`` (``Trainer(inference_mode=True)``, the
    default) where the strategy allows it (``Strategy.evaluates_in_inference_mode``), else
    ``torch.no_grad()``."""
    if trainer.config.inference_mode and trainer.strategy.evaluates_in_inference_mode:
        return torch.inference_mode()
    return torch.no_grad()
