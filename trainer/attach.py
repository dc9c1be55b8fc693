"""Attaching a TrainModule to the Trainer for a stage (fit, validate, test, predict): the module and
its callbacks, the datamodule's ``prepare_data``/``setup``, the ``setup`` hooks, and for the evaluation
stages the prepared model and the checkpoint named by ``ckpt_path``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, cast

from ember.trainer import checkpointing
from ember.trainer.callback_list import check_callbacks, merge_callbacks
from ember.trainer.hooks import call_hook, overridden
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.profilers.timed import backward_call, module_hook, start_stage

if TYPE_CHECKING:
    import torch

    from ember.accelerator import Accelerator
    from ember.callbacks.base import Callback
    from ember.callbacks.model_checkpoint import ModelCheckpoint
    from ember.trainer.trainer import Trainer

__all__ = ["StageAttachment"]


class StageAttachment:
    """Mixed into :class:`~ember.trainer.Trainer`."""

    accelerator: Accelerator
    callbacks: list[Callback]
    stage: str
    _callbacks: list[Callback]
    _module: TrainModule | None
    _datamodule: DataModule | None
    _model: torch.nn.Module | None
    _ckpt_path: str | None
    _backward_pass: Any

    if TYPE_CHECKING:

        @property
        def checkpoint_callback(self) -> ModelCheckpoint | None: ...

        @property
        def is_global_zero(self) -> bool: ...

    def _reattach(
        self, module: TrainModule | None, stage: str, datamodule: DataModule | None, ckpt_path: Any
    ) -> TrainModule:
        callback = self.checkpoint_callback
        if module is None and ckpt_path is None and callback is not None and callback.best_model_path:
            # As Lightning: evaluating the fitted module means evaluating the fit's best checkpoint.
            ckpt_path = "best"
            warnings.warn(
                f"{stage}() was called without a module after fit: the fit's best checkpoint "
                f"({callback.best_model_path}) is loaded. Pass the module ({stage}(module, ...)) for "
                "its current weights, or ckpt_path='best', 'last' or a path to choose (and silence this)",
                stacklevel=3,
            )
        module = module or self._module
        if module is None:
            raise ValueError(f"{stage}() needs a module (none was fitted with this Trainer)")
        already_prepared = module is self._module and self._model is not None
        self._attach(module, stage, datamodule)
        if not already_prepared:
            # As in fit (and Lightning's every stage): a module that builds its layers there gets them.
            with self.accelerator.init_module(empty_init=True):
                module_hook(cast("Trainer", self), "configure_model")()
            self._model = self.accelerator.prepare(module)
        trainer = cast("Trainer", self)
        path = checkpointing.resolve_path(trainer, ckpt_path) if ckpt_path is not None else None
        if path is not None:
            checkpointing.load_weights(trainer, path)
            self._ckpt_path = str(path)  # (trainer.ckpt_path; _attach reset it)
        return module

    def _attach(self, module: TrainModule, stage: str, datamodule: DataModule | None) -> None:
        if not isinstance(module, TrainModule):
            raise TypeError(f"expected an ember.TrainModule, got {type(module).__name__}")
        if hasattr(module, "configure_sharded_model"):  # (Lightning 2.6 still calls it, deprecated)
            raise TypeError(
                f"{type(module).__name__}.configure_sharded_model is Lightning's deprecated name, which ember "
                "never calls: rename it configure_model"
            )
        trainer = cast("Trainer", self)
        self.accelerator._forget()  # checkpoints hold what this stage prepares, nothing older
        self._module = module
        module._trainer = trainer
        self.stage = stage
        self._ckpt_path = None  # trainer.ckpt_path: the stage sets it when it loads a checkpoint
        self._backward_pass = backward_call(trainer)  # through the module's own backward, if it has one
        start_stage(trainer, stage)  # the profiler's report covers this stage, its setup hooks included
        # As Lightning: each stage starts with nothing logged, so that after test() callback_metrics,
        # logged_metrics and progress_bar_metrics hold the test's values alone, and a monitor of a new
        # fit never reads a value of an earlier stage. (A resumed fit loads its own after this.)
        trainer._metrics.clear()
        trainer._progress_bar_stale = True
        from ember.callbacks.base import Callback

        extra = module.configure_callbacks()  # (one Callback, or a sequence of them, as Lightning)
        extra = [extra] if isinstance(extra, Callback) else list(extra)
        self.callbacks = check_callbacks(merge_callbacks(self._callbacks, extra))
        self._datamodule = datamodule
        if datamodule is not None:
            datamodule.trainer = trainer
        prepare_data = overridden(module, "prepare_data")  # (the processes wait only for something)
        if datamodule is not None or prepare_data is not None:
            with self.accelerator.main_process_first():
                if self.is_global_zero:
                    if datamodule is not None:
                        datamodule.prepare_data()
                    if prepare_data is not None:  # after the DataModule's, as Lightning
                        prepare_data()
        if datamodule is not None:
            datamodule.setup(stage)
        call_hook(trainer, "setup", stage)
