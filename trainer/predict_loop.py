"""The predict loop (``Trainer.predict``), beside the fit and evaluation loops of ``loops``; the hook
order it follows is the contract written in docs/concepts/hooks.md."""

from __future__ import annotations

from contextlib import closing
from typing import TYPE_CHECKING, Any

import torch

from ember._tree import apply_to_tensors, other_leaf
from ember.trainer.hooks import call_hook, run_step, step_call
from ember.trainer.loops import _evaluating, _limited, last_batch
from ember.trainer.module_mode import enter_eval, leave_eval
from ember.trainer.prediction import start_record
from ember.trainer.profilers.timed import fetch_action

if TYPE_CHECKING:
    from ember.data import PreparedDataLoader
    from ember.trainer.trainer import Trainer

__all__ = ["run_predict"]


def run_predict(
    trainer: Trainer, loaders: list[PreparedDataLoader], limits: list[int | float], keep: bool = True
) -> list[Any]:
    """Predictions per loader, gathered across processes in the sampler's order, each sample once
    (``keep=False``: handed to the hooks, not kept). With a prediction writer among the callbacks,
    each process's own outputs and their samples' indices are recorded for it as well
    (``trainer.prediction_record``)."""
    accelerator = trainer.accelerator
    modes = enter_eval(trainer, "predict")  # on_predict_model_eval: the model's eval()
    trainer._pass_batches = 0  # (the pass's finished batches, for Lightning's loop views)
    call_hook(trainer, "on_predict_start")
    call_hook(trainer, "on_predict_epoch_start")
    record = trainer._prediction_record = start_record(trainer, len(loaders))  # None: no writer
    results: list[list[Any]] = []
    several = len(loaders) > 1
    store, model, step = (
        trainer._metrics,
        trainer.model,
        step_call(trainer, "predict_step", len(loaders)),
    )  # (once)
    with _evaluating(trainer):
        for loader_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            outputs: list[Any] = []
            last_loader = loader_idx == len(loaders) - 1
            with closing(
                _limited(loader, limit, trainer.config.profiler, fetch_action("predict"))
            ) as batches:
                for batch_idx, batch in batches:
                    trainer._pass_last = last_loader and last_batch(trainer, limit, batch_idx)
                    call_hook(trainer, "on_predict_batch_start", batch, batch_idx, loader_idx)
                    extra = (loader_idx,) if several else ()
                    output = run_step(
                        store, accelerator, model, "predict_step", step, batch, batch_idx, *extra
                    )
                    if record is not None:  # before the gather: the writers take this process's own
                        record.add(loader_idx, loader, output)
                    output = _in_order(accelerator.gather_for_metrics(output), loader._gathered_order)
                    call_hook(trainer, "on_predict_batch_end", output, batch, batch_idx, loader_idx)
                    trainer._pass_batches += 1
                    if keep:
                        outputs.append(output)
            results.append(outputs)
    call_hook(trainer, "on_predict_epoch_end")
    call_hook(trainer, "on_predict_end")
    leave_eval(trainer, "predict", modes)  # each layer back in its mode, as Lightning
    trainer._prediction_record = None  # the writers' copies are not kept past the run
    return results if several else results[0]


def _in_order(gathered: Any, order: list[int] | None) -> Any:
    """``gathered`` (each process's batch in process order) with its samples in ``order``: samples
    are dealt to the processes in turn, so the joined batches interleave (None: already in order)."""
    if order is None:
        return gathered
    if other_leaf(gathered):  # gathered as objects: the processes' lists joined into one
        return (
            [gathered[i] for i in order]
            if isinstance(gathered, list) and len(gathered) == len(order)
            else gathered
        )
    index = torch.tensor(order)

    def reorder(tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.dim() and tensor.shape[0] == len(order)
        return tensor[index.to(tensor.device)] if rows else tensor

    return apply_to_tensors(gathered, reorder)
