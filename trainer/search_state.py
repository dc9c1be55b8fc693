"""What a tuner's search (learning rate, batch size) sets aside and puts back: :func:`preserved`.

A search trains (or evaluates) inside ``on_fit_start`` and must leave the run as it found it. The
weights, optimizer, schedulers, grad scaler, dataloader positions and RNG streams are saved through
the strategy into a scratch directory of ``default_root_dir`` (any layout, every process); the
Trainer's callbacks, loggers, counters and logged values are swapped for fresh ones meanwhile.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from ember.trainer.hooks import call_hook
from ember.trainer.logging import MetricStore
from ember.trainer.metric_history import MetricHistory
from ember.trainer.state import LoopState

if TYPE_CHECKING:
    from ember.callbacks.base import Callback
    from ember.trainer.trainer import Trainer

__all__ = ["NO_SIGNAL", "preserved", "search_batches"]

_STATE_NAME = "search_metrics"  # the logged values' state, saved with the weights before the search
NO_SIGNAL = SimpleNamespace(received=None)  # pre-emption is not acted on inside a search


@contextmanager
def preserved(trainer: Trainer, callbacks: list[Callback], name: str) -> Iterator[None]:
    """Save the run's state, give the Trainer ``callbacks`` (its only ones), no logger and fresh
    counters and logged values for the body, then put everything back as it was. ``name``: the
    scratch directory's prefix (``.<name>-<id>``). Every process must enter it."""
    module = trainer.module
    directory, created = _scratch_directory(trainer, name)
    # Weights, optimizer, schedulers, scaler, loader positions and RNG, through the strategy (any
    # layout); the torchmetrics states the module's steps update come with the logged values.
    trainer.accelerator.save_state(directory, rank_extra={_STATE_NAME: trainer._metrics.state_dict(module)})
    saved = (trainer.callbacks, trainer.loggers, trainer.lr_scheduler_configs, trainer.state, trainer._metrics,
             trainer.metric_history, trainer.should_stop, trainer._progress_bar_values,
             trainer._progress_bar_stale)  # fmt: skip
    try:
        trainer.callbacks, trainer.loggers = callbacks, []
        trainer.state = LoopState(**trainer.state.state_dict())
        trainer._metrics = MetricStore(trainer._reduce_logged)
        trainer.metric_history, trainer.should_stop = MetricHistory(), False
        trainer._hook_plan.refresh()
        yield
    finally:
        (trainer.callbacks, trainer.loggers, trainer.lr_scheduler_configs, trainer.state, trainer._metrics,
         trainer.metric_history, trainer.should_stop, trainer._progress_bar_values,
         trainer._progress_bar_stale) = saved  # fmt: skip
        trainer._hook_plan.refresh()
        try:
            extra = trainer.accelerator.load_state(directory)
            trainer._metrics.load_state_dict(extra[_STATE_NAME], module)
        finally:
            trainer.accelerator.wait_for_everyone()  # every process read it before it goes
            if trainer.is_global_zero:
                _remove(directory, created)


def search_batches(trainer: Trainer) -> Iterator[None]:
    """The training loop of a search: training batches across epochs (with the module's epoch hooks,
    no validation, no pre-emption stop), yielding after each; the caller stops it by leaving the
    loop (the epoch is then not ended). It ends by itself after an epoch that took no optimizer
    step (no data, or every ``training_step`` returned None)."""
    from ember.trainer.loops import _end_epoch, _train_batch  # (the loops import the step code)
    from ember.trainer.step import Epoch

    state, loader = trainer.state, trainer._train_loader
    assert loader is not None
    while True:
        steps_before = state.global_step
        if state.batch_idx == 0:
            loader.set_epoch(state.epoch)
            trainer._metrics.reset()
            call_hook(trainer, "on_train_epoch_start")
        trainer._hook_plan.refresh()
        epoch = dataclasses.replace(Epoch.of(trainer, validates=False), several=False, signals=NO_SIGNAL)
        if epoch.in_sync:
            trainer.accelerator.accumulate(epoch.model, sync=True)
        batches = iter(loader)
        try:
            left = max(0, int(epoch.limit) - state.batch_idx) if epoch.sized else None
            for batch in itertools.islice(batches, left):
                ended = _train_batch(trainer, epoch, batch)  # True: on_train_batch_start ended the epoch
                yield
                if ended:
                    break
        finally:
            batches.close()  # type: ignore[attr-defined]
        _end_epoch(trainer)
        state.next_epoch()
        if state.global_step == steps_before:
            return


def _scratch_directory(trainer: Trainer, name: str) -> tuple[Path, Path | None]:
    """Where the state before the search is kept: a hidden directory of ``default_root_dir`` (a
    place every process can read, also across nodes), named by rank 0; and the first directory the
    save creates on the way there (removed after), None if ``default_root_dir`` exists."""
    name = f".{name}-{uuid.uuid4().hex}"
    if trainer.world_size > 1:
        name = trainer.accelerator.broadcast_object(name)
    root = Path(trainer.default_root_dir).absolute()
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    if trainer.is_global_zero:
        root.mkdir(parents=True, exist_ok=True)
    return root / name, created


def _remove(directory: Path, created: Path | None) -> None:
    """Delete the search's state, and the folders made for it when nothing else went there since."""
    shutil.rmtree(directory, ignore_errors=True)
    if created is None:
        return
    folder = directory.parent
    while True:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        if folder == created:
            return
        folder = folder.parent
