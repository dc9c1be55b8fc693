"""What the predict loop keeps for prediction writers: each process's own ``predict_step`` outputs
and the dataset indices of their samples (:class:`~ember.callbacks.BasePredictionWriter` reads them).

The loop keeps them only while a writer is among the Trainer's callbacks: without one, ``predict``
does exactly what it did before, and the training and evaluation loops never record anything.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ember._ops import truncate
from ember._tree import apply_to_tensors
from ember.callbacks.prediction_writer import BasePredictionWriter

if TYPE_CHECKING:
    from ember.data import PreparedDataLoader
    from ember.trainer.trainer import Trainer

__all__ = ["PredictionRecord", "start_record"]


class PredictionRecord:
    """The running ``predict``'s outputs as this process computed them (not gathered), with the
    dataset indices of their samples; read through ``trainer.prediction_record``.

    - ``prediction``, ``batch_indices``: the current batch's output and the indices of its samples,
      as the loader's sampler produced them and sharding gave them to this process. ``[]`` for an
      ``IterableDataset``, whose samples have no indices (Lightning passes ``[]`` too).
    - ``predictions``, ``epoch_batch_indices``: per dataloader, per batch, the same for the whole
      run; kept only when a writer writes at the epoch's end (outputs moved to the CPU, as Lightning
      does, so that they hold no accelerator memory).

    - ``repeat``: the current batch is a repeat, run only to even out the last step: a process
      whose loader ran out runs a batch from the start of the epoch again so that every process
      steps as often (``gather_for_metrics`` needs that). Nothing of it is recorded and the writers
      skip it, so each sample is written once, as with Lightning's unrepeated predict sampler.
    """

    __slots__ = (
        "_keeps_epoch",
        "_warned",
        "batch_indices",
        "epoch_batch_indices",
        "prediction",
        "predictions",
        "repeat",
    )

    def __init__(self, num_loaders: int, keeps_epoch: bool) -> None:
        self.prediction: Any = None
        self.batch_indices: list[int] = []
        self.predictions: list[list[Any]] = [[] for _ in range(num_loaders)]
        self.epoch_batch_indices: list[list[list[int]]] = [[] for _ in range(num_loaders)]
        self.repeat = False
        self._keeps_epoch = keeps_epoch
        self._warned: set[int] = set()

    def add(self, dataloader_idx: int, loader: PreparedDataLoader, prediction: Any) -> None:
        """Record ``prediction``, the output of the batch ``loader`` yielded last."""
        indices = loader.batch_indices
        if indices is None and dataloader_idx not in self._warned:
            self._warned.add(dataloader_idx)
            warnings.warn(
                f"predict dataloader {dataloader_idx} reads an IterableDataset, whose samples have no "
                "dataset indices: prediction writers receive batch_indices=[] for its batches",
                stacklevel=4,
            )
        own = loader._own_samples  # None: no sample of the batch is a repeat
        self.repeat = own == 0
        if self.repeat:
            self.prediction, self.batch_indices = None, []
            return
        if own is not None:  # (split batches: a slice filled up from the epoch's start)
            prediction, indices = truncate(prediction, own), indices and indices[:own]
        self.prediction = prediction
        self.batch_indices = indices if indices is not None else []
        if self._keeps_epoch:
            self.predictions[dataloader_idx].append(apply_to_tensors(prediction, _to_cpu))
            if indices is not None:  # (Lightning leaves an iterable loader's list empty)
                self.epoch_batch_indices[dataloader_idx].append(indices)


def start_record(trainer: Trainer, num_loaders: int) -> PredictionRecord | None:
    """A fresh record for a ``predict`` over ``num_loaders`` loaders; None when no callback is a
    :class:`~ember.callbacks.BasePredictionWriter` (nothing is recorded then)."""
    writers = [c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)]
    if not writers:
        return None
    return PredictionRecord(num_loaders, keeps_epoch=any(w.interval.on_epoch for w in writers))


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu()
