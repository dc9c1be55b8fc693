"""``ModelCheckpoint``: save checkpoints periodically, keep the best ``save_top_k`` and a ``last``."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember.callbacks import _checkpoint_exception as _exception
from ember.callbacks import _checkpoint_names as _names
from ember.callbacks import _checkpoint_state as _state
from ember.callbacks import _checkpoint_triggers as _triggers
from ember.callbacks._checkpoint_arguments import check_arguments
from ember.callbacks._checkpoint_lightning import LightningCheckpointHelpers
from ember.callbacks.base import Checkpoint, acts_after_validation, acts_at_train_epoch_end
from ember.strategies.checkpoint_swap import copy_checkpoint

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ModelCheckpoint"]

as_score = _names.as_score  # (its earlier home)


class ModelCheckpoint(LightningCheckpointHelpers, Checkpoint):
    """Save the fit's state as checkpoint directories named from a template.

    By default a checkpoint is saved at the end of each training epoch (after its validation; with
    validation several times an epoch or every few epochs, after each validation run instead) in
    ``<default_root_dir>/checkpoints``, keeping the newest one. With ``monitor``, the ``save_top_k`` best by that metric are kept;
    without it the newest checkpoint is the best one.

    Example::

        ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, save_last=True,
                        filename="{epoch}-{step}-{val_loss:.3f}")  # -> epoch=3-step=400-val_loss=0.123
    """

    monitoring = True
    #: The name of ``last``: a template like ``filename`` (``"{epoch}-last"``); set it on the class or an instance.
    CHECKPOINT_NAME_LAST = "last"
    #: Lightning's file suffix. Ember's checkpoints are directories, named without one: ``""`` is the only valid value.
    FILE_EXTENSION = ""
    #: Between a template field's name and value (``auto_insert_metric_name``): ``epoch=3``, as Lightning's.
    CHECKPOINT_EQUALS_CHAR = "="
    #: Lightning's, for the ``-vN`` suffix and its first ``N``: ember accepts only these values.
    CHECKPOINT_JOIN_CHAR, STARTING_VERSION = "-", 1

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        auto_insert_metric_name: bool = True,
        save_on_train_epoch_end: bool | None = None,
        verbose: bool = False,
        save_weights_only: bool = False,
        train_time_interval: timedelta | None = None,
        enable_version_counter: bool = True,
        save_on_exception: bool = False,
    ) -> None:
        check_arguments(
            dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
            save_last=save_last, every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
            auto_insert_metric_name=auto_insert_metric_name, save_on_train_epoch_end=save_on_train_epoch_end,
            verbose=verbose, save_weights_only=save_weights_only, train_time_interval=train_time_interval,
            enable_version_counter=enable_version_counter, save_on_exception=save_on_exception,
        )  # fmt: skip
        # As Lightning, "~" is the home directory; the resolved dirpath after setup.
        self.dirpath = os.path.expanduser(dirpath) if dirpath is not None else None
        self._default_dirpath: str | None = None  # what setup resolved dirpath=None to
        self.filename = filename or "{epoch}-{step}"
        self.monitor, self.mode, self.save_top_k, self.save_last = monitor, mode, save_top_k, save_last
        # 0 is off, as in Lightning; every_n_epochs defaults to 1 only when no trigger is given at all
        self.every_n_train_steps = every_n_train_steps or None
        given = every_n_train_steps is not None or train_time_interval is not None
        self.every_n_epochs = every_n_epochs or None if every_n_epochs is not None or given else 1
        self.train_time_interval = train_time_interval
        self.auto_insert_metric_name = auto_insert_metric_name
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.verbose, self.save_weights_only = verbose, save_weights_only
        self.enable_version_counter = enable_version_counter
        self.save_on_exception = save_on_exception
        self._last_time: float | None = None  # when the train_time_interval clock last started
        self.best_k_models: dict[str, torch.Tensor] = {}  # path -> score (without monitor: its global step)
        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.current_score: torch.Tensor | None = None  # the newest ranked checkpoint's (Lightning's)
        self.last_model_path = ""
        self._last_step_saved = -1
        self._validated = False  # a validation run of this fit ended (Lightning's `_has_run`)
        self._saved_last = False  # save_last: whether `last` was saved yet (else at the fit's end)
        self._deferred = False  # a batch's checkpoint waits for the next validation run (Lightning's)

    @property
    @override
    def state_key(self) -> str:
        key = (
            f"ModelCheckpoint[monitor={self.monitor},mode={self.mode},every_n_train_steps={self.every_n_train_steps},"
            f"every_n_epochs={self.every_n_epochs}"
        )
        return key + (
            f",train_time_interval={self.train_time_interval}]" if self.train_time_interval else "]"
        )

    def resolved_dirpath(self, trainer: Trainer) -> str:
        """The user's ``dirpath``, else ``<default_root_dir>/checkpoints`` of ``trainer``."""
        if self.dirpath is not None and self.dirpath != self._default_dirpath:
            return self.dirpath
        return str(Path(trainer.default_root_dir) / "checkpoints")

    @property
    def last_name(self) -> str:
        """Ember's earlier name of :attr:`CHECKPOINT_NAME_LAST` (reading or setting either is the same)."""
        return self.CHECKPOINT_NAME_LAST

    @last_name.setter
    def last_name(self, value: str) -> None:
        self.CHECKPOINT_NAME_LAST = value

    @property
    def kth_best_model_path(self) -> str:
        """The worst kept checkpoint once ``save_top_k`` are kept (with ``-1``: always); ``""`` before
        that and without ``monitor``, as in Lightning."""
        full = self.save_top_k == -1 or len(self.best_k_models) >= self.save_top_k
        return self._worst() if self.monitor is not None and self.best_k_models and full else ""

    @property
    def kth_value(self) -> torch.Tensor:
        """The score of :attr:`kth_best_model_path`; without one, the worst possible (``inf`` for
        ``mode="min"``, ``-inf`` for ``"max"``)."""
        path = self.kth_best_model_path
        return (
            self.best_k_models[path] if path else torch.tensor(math.inf if self.mode == "min" else -math.inf)
        )

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        _names.check_class_names(self)
        if self.dirpath is None or self.dirpath == self._default_dirpath:  # not the user's: resolve it
            self.dirpath = self._default_dirpath = self.resolved_dirpath(trainer)
        _names.warn_if_not_empty(self, trainer, stage)
        if stage == "fit":  # (here, not at on_train_start: a resumed fit's checkpoint restores them)
            self._validated = self._deferred = False

    # -- when --------------------------------------------------------------------------------------
    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        # Without every_n_train_steps or train_time_interval the batch-end hook only returns (unless
        # a subclass overrides it).
        if (
            not self.every_n_train_steps
            and self.train_time_interval is None
            and type(self).on_train_batch_end is ModelCheckpoint.on_train_batch_end
        ):
            return frozenset({"on_train_batch_end"})
        return frozenset()

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._last_time = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step_saved or not _triggers.batch_due(self, trainer):
            return
        if _triggers.waits_for_validation(self, trainer):
            self._deferred = True  # saved at the end of the next validation run (if it acts there)
            return
        self._save(trainer)

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if (
            self.save_last and not self._saved_last and not trainer.fast_dev_run
        ):  # as Lightning 2.6: save_last always leaves one
            trainer.save_checkpoint(self.claim_last(trainer), weights_only=self.save_weights_only)

    @override
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        if self.save_on_exception:
            _exception.save_on_exception(self, trainer, exception)

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.stage == "fit" and not trainer.sanity_checking:
            self._validated = True  # from now on a monitor never logged is an error
        if not acts_after_validation(trainer, self.save_on_train_epoch_end):
            return
        if self._deferred:  # a batch's checkpoint that waited for this run's values
            self._deferred = False
            if trainer.global_step != self._last_step_saved:
                self._save(trainer)
        elif self._epoch_due(trainer):
            self._save(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if acts_at_train_epoch_end(trainer, self.save_on_train_epoch_end) and self._epoch_due(trainer):
            self._save(trainer)

    def _epoch_due(self, trainer: Trainer) -> bool:
        n = self.every_n_epochs
        if n is None or trainer.global_step == self._last_step_saved:
            return False
        return (trainer.current_epoch + 1) % n == 0

    # -- what --------------------------------------------------------------------------------------
    def format_name(self, metrics: dict[str, float], epoch: int, step: int) -> str:
        """``filename`` filled in: ``"{epoch}-{val_loss:.2f}"`` -> ``epoch=3-val_loss=0.12``."""
        where = f"ModelCheckpoint(filename={self.filename!r})"
        insert = self.CHECKPOINT_EQUALS_CHAR if self.auto_insert_metric_name else None
        return _names.fill_template(self.filename, where, metrics, epoch, step, insert)

    def format_checkpoint_name(
        self,
        metrics: Mapping[str, Any],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        """Lightning's: ``<dirpath>/[prefix-]<filename filled from metrics>[-v<ver>]`` (``epoch`` and
        ``step`` from ``metrics``, else 0; no extension). ``{"epoch": 2}`` and ``"{epoch}"`` -> ``.../epoch=2``."""
        return _names.checkpoint_name(self, metrics, filename, ver, prefix)

    def _score(self, trainer: Trainer) -> float | None:
        if self.monitor is None:
            return None
        if self.monitor not in trainer.callback_metrics:
            message = (
                f"ModelCheckpoint(monitor={self.monitor!r}) could not find {self.monitor!r} in the logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Log it with self.log({self.monitor!r}, ...) or fix the name."
            )
            if self._validated:
                raise KeyError(message)
            # As Lightning: before the first validation run of the fit, a validation value may come later.
            warnings.warn(f"{message} No validation run yet: no checkpoint ranked", stacklevel=2)
            return None
        return float(trainer.callback_metrics[self.monitor])

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _plan(self, trainer: Trainer) -> dict[str, Any]:
        """Rank 0 decides what to write and remove; the decision is broadcast so every rank agrees."""
        score = self._score(trainer)
        if score is not None and math.isnan(score):  # as Lightning: NaN ranks as the worst value
            score = math.inf if self.mode == "min" else -math.inf
        metrics = _names.metrics_of(trainer)
        directory = Path(self.resolved_dirpath(trainer))
        plan: dict[str, Any] = {"save": None, "remove": [], "last": None, "score": score}
        unranked = self.monitor is not None and score is None  # not logged yet (warned)
        keep_it = not unranked and (
            self.save_top_k == -1
            or (
                self.save_top_k > 0
                and (
                    score is None
                    or len(self.best_k_models) < self.save_top_k
                    or self._better(score, float(self.best_k_models[self._worst()]))
                )
            )
        )
        if keep_it:
            name = self.format_name(metrics, trainer.current_epoch, trainer.global_step)
            # As Lightning: the one this supersedes may be written over (atomically: "best" stays `best`).
            superseded = self._superseded(score)
            taken = set(self.best_k_models) - {superseded}
            free = _names.free_path(
                directory, name, taken, self.enable_version_counter, replaceable=superseded
            )
            plan["save"] = str(free)
        if self.save_last:
            plan["last"] = self.last_path(trainer, metrics, also_taken=[plan["save"]] if plan["save"] else [])
        return plan

    def last_path(
        self, trainer: Trainer, metrics: dict[str, float] | None = None, also_taken: list[str] | None = None
    ) -> str:
        """Where ``last`` goes: ``CHECKPOINT_NAME_LAST`` filled in like ``filename``. This run's (or the
        resumed run's) last checkpoint while its name stays the same; else that name, or ``-vN``
        past the ``last`` checkpoints of earlier runs (asked on rank 0)."""
        return _names.last_path(self, trainer, metrics, also_taken or [])

    def claim_last(self, trainer: Trainer) -> str:
        """:meth:`last_path`, decided on rank 0 for every process and kept as ``last_model_path``
        (a save outside this callback's schedule: pre-emption)."""
        path = self.last_path(trainer) if trainer.is_global_zero else ""
        if trainer.world_size > 1:  # rank 0 looked at the directory: every rank saves there
            path = trainer.accelerator.broadcast_object(path)
        self.last_model_path, self._saved_last = path, True
        return path

    def _superseded(self, score: float | None) -> str:
        """The kept checkpoint a new one with ``score`` removes (the worst once ``save_top_k`` are kept;
        without ``monitor``, the previous one), or ``""``."""
        full = self.save_top_k == 1 if score is None else 0 < self.save_top_k <= len(self.best_k_models)
        return self._worst() if self.best_k_models and full else ""

    def _rank(self, path: str) -> float:
        """Higher is better: the monitored value (negated for ``mode="min"``); without ``monitor``
        the global step it was saved at, so that the newest checkpoint is the best, as in Lightning."""
        value = float(self.best_k_models[path])
        return -value if self.monitor is not None and self.mode == "min" else value

    def _best(self) -> str:
        return max(self.best_k_models, key=self._rank)  # the first kept of equals

    def _worst(self) -> str:
        return min(self.best_k_models, key=self._rank)

    def _keep(self, trainer: Trainer, path: str, score: float | None) -> list[str]:
        """Rank ``path`` among the kept checkpoints and update the best; returns the ones it supersedes."""
        removed: list[str] = []
        if score is None and self.save_top_k != -1:
            removed = list(self.best_k_models)  # no monitor: keep only the newest
            self.best_k_models = {}
        self.best_k_models[path] = _names.as_score(score if score is not None else float(trainer.global_step))
        if self.save_top_k > 0 and len(self.best_k_models) > self.save_top_k:
            worst = self._worst()
            del self.best_k_models[worst]
            removed.append(worst)
        self.best_model_path = self._best()
        self.current_score = _names.as_score(score) if score is not None else None
        self.best_model_score = self.best_k_models[self.best_model_path] if score is not None else None
        return removed

    def _superseded_last(self, previous: str, plan: dict[str, Any]) -> list[str]:
        """The previous ``last`` when ``last`` got a new name (``CHECKPOINT_NAME_LAST="{epoch}-last"``),
        in the same directory and not one of the kept checkpoints."""
        new = plan["last"]
        if new is None or not previous or previous == new or previous in self.best_k_models:
            return []
        return [previous] if Path(previous).parent == Path(new).parent else []

    def _save(self, trainer: Trainer) -> None:
        if trainer.fast_dev_run:  # a smoke test of the loop leaves no checkpoint (as Lightning documents)
            return
        plan = trainer.accelerator.broadcast_object(self._plan(trainer) if trainer.is_global_zero else None)
        self._last_step_saved = trainer.global_step
        stale = self._superseded_last(self.last_model_path, plan)
        if plan["last"] is not None:
            self.last_model_path = plan["last"]  # before saving, so both copies hold the same state
            self._saved_last = True
        if plan["save"] is not None:
            path = plan["save"]
            removed = self._keep(trainer, path, plan["score"])
            self._report(trainer, path, plan["score"])
            # after updating our state, so the checkpoint includes it
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)
            if trainer.is_global_zero:
                # Order matters for a crash: the new checkpoint is complete, then `last` is swapped
                # to it atomically, and only then are the ones it supersedes removed.
                if plan["last"] is not None:  # the same state: link its files instead of saving again
                    copy_checkpoint(Path(path), Path(plan["last"]))
                _names.remove_checkpoints([old for old in removed + stale if old != path])
            trainer.strategy.barrier("ModelCheckpoint:last")
        else:
            self._report(trainer, None, plan["score"])
            if plan["last"] is not None:
                trainer.save_checkpoint(plan["last"], weights_only=self.save_weights_only)
                if trainer.is_global_zero:
                    _names.remove_checkpoints(stale)
        if trainer.is_global_zero and (plan["save"] or plan["last"]):  # e.g. WandbLogger(log_model=) uploads
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _report(self, trainer: Trainer, path: str | None, score: float | None) -> None:
        """``verbose``: say on rank 0 what is saved and why."""
        if self.verbose and trainer.is_global_zero:
            _names.report(self, trainer, path, score)

    # -- state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return _state.state_of(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _state.load_state(self, state_dict)

    def __repr__(self) -> str:
        return f"ModelCheckpoint(monitor={self.monitor!r}, mode={self.mode!r}, save_top_k={self.save_top_k})"
