"""``BasePredictionWriter``: write ``predict``'s outputs as each process computes them (Lightning's)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember._validation import check_choice
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.prediction import PredictionRecord
    from ember.trainer.trainer import Trainer

__all__ = ["BasePredictionWriter", "WriteInterval"]


class WriteInterval(str, enum.Enum):
    """When a :class:`BasePredictionWriter` writes: after each batch, at the end of the run, or both."""

    BATCH = "batch"
    EPOCH = "epoch"
    BATCH_AND_EPOCH = "batch_and_epoch"

    @property
    def on_batch(self) -> bool:
        return self in (WriteInterval.BATCH, WriteInterval.BATCH_AND_EPOCH)

    @property
    def on_epoch(self) -> bool:
        return self in (WriteInterval.EPOCH, WriteInterval.BATCH_AND_EPOCH)


class BasePredictionWriter(Callback):
    """Base class of callbacks that write predictions, each process its own (Lightning's).

    Override :meth:`write_on_batch_end` (``write_interval="batch"``, the default),
    :meth:`write_on_epoch_end` (``"epoch"``) or both (``"batch_and_epoch"``). They run on every
    process with that process's own ``predict_step`` outputs, not gathered, and the dataset indices
    of their samples, so that each process writes its own file and nothing has to fit in one
    process's memory: use ``trainer.predict(module, loader, return_predictions=False)``.

    With several processes, the prepared loader gives each one every ``world_size``-th batch of the
    sampler's batches, so ``batch_indices`` say which samples a process predicted. Each sample is
    written once, as in Lightning: a process that has no batch left in the last step runs one from
    the start of the epoch again (every process steps as often), but the writer does not get it.

    Example::

        class Writer(BasePredictionWriter):
            def __init__(self, out_dir):
                super().__init__(write_interval="epoch")
                self.out_dir = out_dir

            def write_on_epoch_end(self, trainer, module, predictions, batch_indices):
                torch.save(
                    {"predictions": predictions, "batch_indices": batch_indices},
                    f"{self.out_dir}/predictions_{trainer.global_rank}.pt",
                )

        trainer = Trainer(devices=2, callbacks=[Writer("preds")])
        trainer.predict(module, loader, return_predictions=False)
    """

    def __init__(self, write_interval: str = "batch") -> None:
        owner = type(self).__name__
        check_choice("write_interval", write_interval, [i.value for i in WriteInterval], owner=owner)
        self.interval = WriteInterval(write_interval)
        # A writer that would write nothing at the interval it asked for is a mistake found now
        # (Lightning raises NotImplementedError at the first write instead).
        wanted = {"write_on_batch_end": self.interval.on_batch, "write_on_epoch_end": self.interval.on_epoch}
        for name, writes in wanted.items():
            if writes and getattr(type(self), name) is getattr(BasePredictionWriter, name):
                raise TypeError(f"{owner}(write_interval={write_interval!r}) must override {name}()")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        prediction: Any,
        batch_indices: Sequence[int],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write one batch's ``prediction`` (this process's ``predict_step`` output, on its device).

        ``batch_indices``: the dataset indices of the batch's samples on this process (``[]`` for an
        ``IterableDataset``, whose samples have none); ``batch_idx`` counts this process's batches
        of loader ``dataloader_idx``. Does nothing unless overridden."""

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Write every prediction of this process, once the loaders are done (outputs on the CPU).

        Lightning's shapes: ``predictions`` is the list of per-batch outputs when there is one
        loader, and a list of those per loader when there are several; ``batch_indices`` is always
        a list per loader of per-batch index lists (``batch_indices[0][i]`` goes with
        ``predictions[i]`` with one loader). An ``IterableDataset``'s list of indices is empty.
        Does nothing unless overridden."""

    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        # The hook of the interval it does not write at does nothing (unless a subclass overrides it).
        unused = [] if self.interval.on_batch else ["on_predict_batch_end"]
        unused += [] if self.interval.on_epoch else ["on_predict_epoch_end"]
        return frozenset(
            name for name in unused if getattr(type(self), name) is getattr(BasePredictionWriter, name)
        )

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # `outputs` are gathered from every process; the writer takes this process's own.
        record = _record(trainer)
        if record.repeat:  # a batch run again to even out the last step: its samples are written already
            return
        self.write_on_batch_end(
            trainer, module, record.prediction, record.batch_indices, batch, batch_idx, dataloader_idx
        )

    @override
    def on_predict_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        record = _record(trainer)
        predictions = record.predictions[0] if len(record.predictions) == 1 else record.predictions
        self.write_on_epoch_end(trainer, module, predictions, record.epoch_batch_indices)


def _record(trainer: Trainer) -> PredictionRecord:
    record = trainer.prediction_record
    if record is None:
        raise RuntimeError(
            "a prediction writer's hook ran outside Trainer.predict, or the writer was added to "
            "trainer.callbacks after predict started: nothing was recorded for it"
        )
    return record
