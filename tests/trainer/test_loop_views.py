"""Lightning's loop objects as views of ember's state (``trainer.fit_loop``, its ``epoch_loop`` and
``val_loop``, ``validate_loop``, ``test_loop``, ``predict_loop``): the counters a callback reads at
each hook equal Lightning 2.6.6's at the same points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback


def _loader(n: int) -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=1)


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def test_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _counts(p: Any) -> tuple[int, int, int, int]:
    return (p.ready, p.started, p.processed, p.completed)


def _fit_row(trainer: Trainer, hook: str, idx: int) -> tuple[Any, ...]:
    """hook, index, fit_loop.epoch_progress.current, epoch_loop.batch_progress .current and .total,
    _batches_that_stepped, global_step, fit_loop.total_batch_idx, fit_loop.batch_idx, is_last_batch."""
    fit, epoch = trainer.fit_loop, trainer.fit_loop.epoch_loop
    batches = epoch.batch_progress
    return (hook, idx, _counts(fit.epoch_progress.current), _counts(batches.current), _counts(batches.total),
            epoch._batches_that_stepped, epoch.global_step, fit.total_batch_idx, fit.batch_idx,
            batches.is_last_batch)  # fmt: skip


class Record(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def _row(self, trainer: Trainer, hook: str, idx: int) -> None:
        fit = trainer.fit_loop
        assert fit.epoch_progress.current == fit.epoch_progress.total
        row = _fit_row(trainer, hook, idx)
        if hook.startswith("ve"):
            row += (_counts(fit.epoch_loop.val_loop.batch_progress.current),)
        self.rows.append(row)

    def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._row(trainer, "tbs", batch_idx)

    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._row(trainer, "tbe", batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, module: Any) -> None:
        self._row(trainer, "tee", trainer.current_epoch)

    def on_validation_end(self, trainer: Trainer, module: Any) -> None:
        self._row(trainer, "veS" if trainer.sanity_checking else "ve", trainer.current_epoch)


# Recorded with Lightning 2.6.6 (same fit: 5 training batches, 2 validation batches, a 1-batch sanity
# check, accumulate_grad_batches=2, 2 epochs): hook, batch index or epoch, fit_loop.epoch_progress
# .current, epoch_loop.batch_progress.current and .total (ready, started, processed, completed),
# epoch_loop._batches_that_stepped, global_step, fit_loop.total_batch_idx, fit_loop.batch_idx,
# is_last_batch, and
# at on_validation_end val_loop.batch_progress.current.
LIGHTNING = [
    ("veS", 0, (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), 0, 0, -1, -1, False, (1, 1, 1, 1)),
    ("tbs", 0, (1, 1, 0, 0), (1, 0, 0, 0), (1, 0, 0, 0), 0, 0, 0, 0, False),
    ("tbe", 0, (1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 1, 0), 0, 0, 0, 0, False),
    ("tbs", 1, (1, 1, 0, 0), (2, 1, 1, 1), (2, 1, 1, 1), 0, 0, 1, 1, False),
    ("tbe", 1, (1, 1, 0, 0), (2, 2, 2, 1), (2, 2, 2, 1), 0, 1, 1, 1, False),
    ("tbs", 2, (1, 1, 0, 0), (3, 2, 2, 2), (3, 2, 2, 2), 1, 1, 2, 2, False),
    ("tbe", 2, (1, 1, 0, 0), (3, 3, 3, 2), (3, 3, 3, 2), 1, 1, 2, 2, False),
    ("tbs", 3, (1, 1, 0, 0), (4, 3, 3, 3), (4, 3, 3, 3), 1, 1, 3, 3, False),
    ("tbe", 3, (1, 1, 0, 0), (4, 4, 4, 3), (4, 4, 4, 3), 1, 2, 3, 3, False),
    ("tbs", 4, (1, 1, 0, 0), (5, 4, 4, 4), (5, 4, 4, 4), 2, 2, 4, 4, True),
    ("tbe", 4, (1, 1, 0, 0), (5, 5, 5, 4), (5, 5, 5, 4), 2, 3, 4, 4, True),
    ("ve", 0, (1, 1, 0, 0), (5, 5, 5, 5), (5, 5, 5, 5), 2, 3, 4, 4, True, (2, 2, 2, 2)),
    ("tee", 0, (1, 1, 1, 0), (5, 5, 5, 5), (5, 5, 5, 5), 3, 3, 4, 4, True),
    ("tbs", 0, (2, 2, 1, 1), (1, 0, 0, 0), (6, 5, 5, 5), 3, 3, 5, 0, False),
    ("tbe", 0, (2, 2, 1, 1), (1, 1, 1, 0), (6, 6, 6, 5), 3, 3, 5, 0, False),
    ("tbs", 1, (2, 2, 1, 1), (2, 1, 1, 1), (7, 6, 6, 6), 3, 3, 6, 1, False),
    ("tbe", 1, (2, 2, 1, 1), (2, 2, 2, 1), (7, 7, 7, 6), 3, 4, 6, 1, False),
    ("tbs", 2, (2, 2, 1, 1), (3, 2, 2, 2), (8, 7, 7, 7), 4, 4, 7, 2, False),
    ("tbe", 2, (2, 2, 1, 1), (3, 3, 3, 2), (8, 8, 8, 7), 4, 4, 7, 2, False),
    ("tbs", 3, (2, 2, 1, 1), (4, 3, 3, 3), (9, 8, 8, 8), 4, 4, 8, 3, False),
    ("tbe", 3, (2, 2, 1, 1), (4, 4, 4, 3), (9, 9, 9, 8), 4, 5, 8, 3, False),
    ("tbs", 4, (2, 2, 1, 1), (5, 4, 4, 4), (10, 9, 9, 9), 5, 5, 9, 4, True),
    ("tbe", 4, (2, 2, 1, 1), (5, 5, 5, 4), (10, 10, 10, 9), 5, 6, 9, 4, True),
    ("ve", 1, (2, 2, 1, 1), (5, 5, 5, 5), (10, 10, 10, 10), 5, 6, 9, 4, True, (2, 2, 2, 2)),
    ("tee", 1, (2, 2, 2, 1), (5, 5, 5, 5), (10, 10, 10, 10), 6, 6, 9, 4, True),
]


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
    return Trainer(**{**settings, **kwargs})


def test_fit_loop_counters_match_lightning(tmp_path: Path) -> None:
    record = Record()
    trainer = _trainer(tmp_path, accumulate_grad_batches=2, num_sanity_val_steps=1, callbacks=[record])
    trainer.fit(Net(), _loader(5), _loader(2))
    assert record.rows == LIGHTNING
    # After the fit, as Lightning's: the epochs done, the last epoch's batches and the fit's
    fit = trainer.fit_loop
    assert _counts(fit.epoch_progress.current) == (2, 2, 2, 2)
    assert _counts(fit.epoch_loop.batch_progress.current) == (5, 5, 5, 5)
    assert _counts(fit.epoch_loop.batch_progress.total) == (10, 10, 10, 10)
    assert (fit.epoch_loop._batches_that_stepped, fit.epoch_loop.global_step) == (6, 6)
    assert (fit.max_epochs, fit.min_epochs, fit.max_steps, fit.epoch_loop.max_steps) == (2, None, -1, -1)
    assert _counts(fit.epoch_loop.val_loop.batch_progress.total) == (2, 2, 2, 2)


class InBatch(Callback):
    """The counters inside a batch: in ``training_step`` (the module calls ``row``) and the hooks
    around its backward and optimizer step; and between epochs, at the end of training, after the fit."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def row(self, trainer: Trainer, hook: str, idx: int) -> None:
        self.rows.append(_fit_row(trainer, hook, idx))

    def on_train_epoch_start(self, trainer: Trainer, module: Any) -> None:
        self.row(trainer, "tes", trainer.current_epoch)

    def on_train_end(self, trainer: Trainer, module: Any) -> None:
        self.row(trainer, "te", trainer.current_epoch)

    def on_before_backward(self, trainer: Trainer, module: Any, loss: torch.Tensor) -> None:
        self.row(trainer, "bb", trainer.fit_loop.epoch_loop.batch_idx)

    def on_before_optimizer_step(self, trainer: Trainer, module: Any, optimizer: Any) -> None:
        self.row(trainer, "bos", trainer.fit_loop.epoch_loop.batch_idx)


# Recorded with Lightning 2.6.6 (the fit of LIGHTNING) as there: in on_train_epoch_start ("tes"),
# training_step ("ts", its batch_idx argument), on_before_backward ("bb"), on_before_optimizer_step
# ("bos", at the step boundaries of accumulate_grad_batches=2; their index is
# fit_loop.epoch_loop.batch_idx), on_train_end ("te") and after the fit ("after"); the epoch hooks'
# index is current_epoch.
LIGHTNING_IN_BATCH = [
    ("tes", 0, (1, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), 0, 0, -1, -1, False),
    ("ts", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("bb", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("ts", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 0, 0, 1, 1, False),
    ("bb", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 0, 0, 1, 1, False),
    ("bos", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 0, 0, 1, 1, False),
    ("ts", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 1, 1, 2, 2, False),
    ("bb", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 1, 1, 2, 2, False),
    ("ts", 3, (1, 1, 0, 0), (4, 4, 3, 3), (4, 4, 3, 3), 1, 1, 3, 3, False),
    ("bb", 3, (1, 1, 0, 0), (4, 4, 3, 3), (4, 4, 3, 3), 1, 1, 3, 3, False),
    ("bos", 3, (1, 1, 0, 0), (4, 4, 3, 3), (4, 4, 3, 3), 1, 1, 3, 3, False),
    ("ts", 4, (1, 1, 0, 0), (5, 5, 4, 4), (5, 5, 4, 4), 2, 2, 4, 4, True),
    ("bb", 4, (1, 1, 0, 0), (5, 5, 4, 4), (5, 5, 4, 4), 2, 2, 4, 4, True),
    ("bos", 4, (1, 1, 0, 0), (5, 5, 4, 4), (5, 5, 4, 4), 2, 2, 4, 4, True),
    ("tes", 1, (2, 1, 1, 1), (5, 5, 5, 5), (5, 5, 5, 5), 3, 3, 4, 4, True),
    ("ts", 0, (2, 2, 1, 1), (1, 1, 0, 0), (6, 6, 5, 5), 3, 3, 5, 0, False),
    ("bb", 0, (2, 2, 1, 1), (1, 1, 0, 0), (6, 6, 5, 5), 3, 3, 5, 0, False),
    ("ts", 1, (2, 2, 1, 1), (2, 2, 1, 1), (7, 7, 6, 6), 3, 3, 6, 1, False),
    ("bb", 1, (2, 2, 1, 1), (2, 2, 1, 1), (7, 7, 6, 6), 3, 3, 6, 1, False),
    ("bos", 1, (2, 2, 1, 1), (2, 2, 1, 1), (7, 7, 6, 6), 3, 3, 6, 1, False),
    ("ts", 2, (2, 2, 1, 1), (3, 3, 2, 2), (8, 8, 7, 7), 4, 4, 7, 2, False),
    ("bb", 2, (2, 2, 1, 1), (3, 3, 2, 2), (8, 8, 7, 7), 4, 4, 7, 2, False),
    ("ts", 3, (2, 2, 1, 1), (4, 4, 3, 3), (9, 9, 8, 8), 4, 4, 8, 3, False),
    ("bb", 3, (2, 2, 1, 1), (4, 4, 3, 3), (9, 9, 8, 8), 4, 4, 8, 3, False),
    ("bos", 3, (2, 2, 1, 1), (4, 4, 3, 3), (9, 9, 8, 8), 4, 4, 8, 3, False),
    ("ts", 4, (2, 2, 1, 1), (5, 5, 4, 4), (10, 10, 9, 9), 5, 5, 9, 4, True),
    ("bb", 4, (2, 2, 1, 1), (5, 5, 4, 4), (10, 10, 9, 9), 5, 5, 9, 4, True),
    ("bos", 4, (2, 2, 1, 1), (5, 5, 4, 4), (10, 10, 9, 9), 5, 5, 9, 4, True),
    ("te", 2, (2, 2, 2, 2), (5, 5, 5, 5), (10, 10, 10, 10), 6, 6, 9, 4, True),
    ("after", 2, (2, 2, 2, 2), (5, 5, 5, 5), (10, 10, 10, 10), 6, 6, 9, 4, True),
]


def test_fit_loop_counters_inside_a_batch_between_epochs_and_after_the_fit_match_lightning(
    tmp_path: Path,
) -> None:
    record = InBatch()

    class Reading(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            record.row(self.trainer, "ts", batch_idx)
            return super().training_step(batch, batch_idx)

    trainer = _trainer(tmp_path, accumulate_grad_batches=2, num_sanity_val_steps=1, callbacks=[record])
    trainer.fit(Reading(), _loader(5), _loader(2))
    record.row(trainer, "after", trainer.current_epoch)
    assert record.rows == LIGHTNING_IN_BATCH
    assert not trainer._in_batch


# Recorded with Lightning 2.6.6 under manual optimisation (3 training batches, 2 epochs, no
# validation), as LIGHTNING_IN_BATCH; inside training_step also after manual_backward ("tsb") and
# after the optimizer's step ("tss"), where on_before_optimizer_step ("bos") ran in between.
LIGHTNING_MANUAL = [
    ("tes", 0, (1, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), 0, 0, -1, -1, False),
    ("ts", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("bb", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("tsb", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("bos", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 0, 0, 0, False),
    ("tss", 0, (1, 1, 0, 0), (1, 1, 0, 0), (1, 1, 0, 0), 0, 1, 0, 0, False),
    ("ts", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 1, 1, 1, 1, False),
    ("bb", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 1, 1, 1, 1, False),
    ("tsb", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 1, 1, 1, 1, False),
    ("bos", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 1, 1, 1, 1, False),
    ("tss", 1, (1, 1, 0, 0), (2, 2, 1, 1), (2, 2, 1, 1), 1, 2, 1, 1, False),
    ("ts", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 2, 2, 2, 2, True),
    ("bb", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 2, 2, 2, 2, True),
    ("tsb", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 2, 2, 2, 2, True),
    ("bos", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 2, 2, 2, 2, True),
    ("tss", 2, (1, 1, 0, 0), (3, 3, 2, 2), (3, 3, 2, 2), 2, 3, 2, 2, True),
    ("tes", 1, (2, 1, 1, 1), (3, 3, 3, 3), (3, 3, 3, 3), 3, 3, 2, 2, True),
    ("ts", 0, (2, 2, 1, 1), (1, 1, 0, 0), (4, 4, 3, 3), 3, 3, 3, 0, False),
    ("bb", 0, (2, 2, 1, 1), (1, 1, 0, 0), (4, 4, 3, 3), 3, 3, 3, 0, False),
    ("tsb", 0, (2, 2, 1, 1), (1, 1, 0, 0), (4, 4, 3, 3), 3, 3, 3, 0, False),
    ("bos", 0, (2, 2, 1, 1), (1, 1, 0, 0), (4, 4, 3, 3), 3, 3, 3, 0, False),
    ("tss", 0, (2, 2, 1, 1), (1, 1, 0, 0), (4, 4, 3, 3), 3, 4, 3, 0, False),
    ("ts", 1, (2, 2, 1, 1), (2, 2, 1, 1), (5, 5, 4, 4), 4, 4, 4, 1, False),
    ("bb", 1, (2, 2, 1, 1), (2, 2, 1, 1), (5, 5, 4, 4), 4, 4, 4, 1, False),
    ("tsb", 1, (2, 2, 1, 1), (2, 2, 1, 1), (5, 5, 4, 4), 4, 4, 4, 1, False),
    ("bos", 1, (2, 2, 1, 1), (2, 2, 1, 1), (5, 5, 4, 4), 4, 4, 4, 1, False),
    ("tss", 1, (2, 2, 1, 1), (2, 2, 1, 1), (5, 5, 4, 4), 4, 5, 4, 1, False),
    ("ts", 2, (2, 2, 1, 1), (3, 3, 2, 2), (6, 6, 5, 5), 5, 5, 5, 2, True),
    ("bb", 2, (2, 2, 1, 1), (3, 3, 2, 2), (6, 6, 5, 5), 5, 5, 5, 2, True),
    ("tsb", 2, (2, 2, 1, 1), (3, 3, 2, 2), (6, 6, 5, 5), 5, 5, 5, 2, True),
    ("bos", 2, (2, 2, 1, 1), (3, 3, 2, 2), (6, 6, 5, 5), 5, 5, 5, 2, True),
    ("tss", 2, (2, 2, 1, 1), (3, 3, 2, 2), (6, 6, 5, 5), 5, 6, 5, 2, True),
    ("te", 2, (2, 2, 2, 2), (3, 3, 3, 3), (6, 6, 6, 6), 6, 6, 5, 2, True),
    ("after", 2, (2, 2, 2, 2), (3, 3, 3, 3), (6, 6, 6, 6), 6, 6, 5, 2, True),
]


def test_fit_loop_counters_under_manual_optimization_match_lightning(tmp_path: Path) -> None:
    record = InBatch()

    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            record.row(self.trainer, "ts", batch_idx)
            optimizer = self.optimizers()
            self.manual_backward(self.layer(batch[0]).sum())
            record.row(self.trainer, "tsb", batch_idx)
            optimizer.step()
            optimizer.zero_grad()
            record.row(self.trainer, "tss", batch_idx)

    trainer = _trainer(tmp_path, callbacks=[record])
    trainer.fit(Manual(), _loader(3))
    record.row(trainer, "after", trainer.current_epoch)
    assert record.rows == LIGHTNING_MANUAL


class EvalRecord(Callback):
    """An evaluation loop's ``batch_progress`` (current, total, is_last_batch) at each of its hooks;
    the module's steps call ``row`` too."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.in_fit = False

    def row(self, trainer: Trainer, kind: str, hook: str, *ids: int) -> None:
        if kind == "val":
            loop = trainer.fit_loop.epoch_loop.val_loop if self.in_fit else trainer.validate_loop
        else:
            loop = trainer.test_loop if kind == "test" else trainer.predict_loop
        progress = loop.batch_progress
        self.rows.append(
            (kind, hook, *ids, _counts(progress.current), _counts(progress.total), progress.is_last_batch)
        )


def _eval_hooks(prefix: str, kind: str) -> dict[str, Any]:
    def start(self: EvalRecord, trainer: Trainer, module: Any, batch: Any, i: int, d: int = 0) -> None:
        self.row(trainer, kind, "bs", i, d)

    def end(
        self: EvalRecord, trainer: Trainer, module: Any, out: Any, batch: Any, i: int, d: int = 0
    ) -> None:
        self.row(trainer, kind, "be", i, d)

    return {
        f"on_{prefix}_batch_start": start,
        f"on_{prefix}_batch_end": end,
        f"on_{prefix}_start": lambda self, trainer, module: self.row(trainer, kind, "st"),
        f"on_{prefix}_epoch_start": lambda self, trainer, module: self.row(trainer, kind, "es"),
        f"on_{prefix}_epoch_end": lambda self, trainer, module: self.row(trainer, kind, "ee"),
        f"on_{prefix}_end": lambda self, trainer, module: self.row(trainer, kind, "end"),
    }


for _prefix, _kind in (("validation", "val"), ("test", "test"), ("predict", "predict")):
    for _name, _hook in _eval_hooks(_prefix, _kind).items():
        setattr(EvalRecord, _name, _hook)


# Recorded with Lightning 2.6.6 at each hook of an evaluation loop ("st" start, "es" epoch start,
# "bs" batch start, the step, "be" batch end, "ee" epoch end, "end"): the hook, batch index and
# loader index, batch_progress.current and .total (ready, started, processed, completed) and
# is_last_batch. A fit of one epoch (2 training batches) with a 1-batch sanity check and 2
# validation batches:
LIGHTNING_FIT_VALIDATION = [
    ("val", "st", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("val", "es", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("val", "bs", 0, 0, (1, 0, 0, 0), (1, 0, 0, 0), True),
    ("val", "step", 0, 0, (1, 1, 0, 0), (1, 1, 0, 0), True),
    ("val", "be", 0, 0, (1, 1, 1, 0), (1, 1, 1, 0), True),
    ("val", "ee", (1, 1, 1, 1), (1, 1, 1, 1), True),
    ("val", "end", (1, 1, 1, 1), (1, 1, 1, 1), True),
    ("val", "st", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("val", "es", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("val", "bs", 0, 0, (1, 0, 0, 0), (1, 0, 0, 0), False),
    ("val", "step", 0, 0, (1, 1, 0, 0), (1, 1, 0, 0), False),
    ("val", "be", 0, 0, (1, 1, 1, 0), (1, 1, 1, 0), False),
    ("val", "bs", 1, 0, (2, 1, 1, 1), (2, 1, 1, 1), True),
    ("val", "step", 1, 0, (2, 2, 1, 1), (2, 2, 1, 1), True),
    ("val", "be", 1, 0, (2, 2, 2, 1), (2, 2, 2, 1), True),
    ("val", "ee", (2, 2, 2, 2), (2, 2, 2, 2), True),
    ("val", "end", (2, 2, 2, 2), (2, 2, 2, 2), True),
]
# then validate, test and predict, each on two loaders of 2 and 1 batches, every one of them the same
# (Lightning's predict loop has no is_last_batch in its start hooks: ember's is False there):
LIGHTNING_PASS = [
    ("st", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("es", (0, 0, 0, 0), (0, 0, 0, 0), False),
    ("bs", 0, 0, (1, 0, 0, 0), (1, 0, 0, 0), False),
    ("step", 0, 0, (1, 1, 0, 0), (1, 1, 0, 0), False),
    ("be", 0, 0, (1, 1, 1, 0), (1, 1, 1, 0), False),
    ("bs", 1, 0, (2, 1, 1, 1), (2, 1, 1, 1), False),
    ("step", 1, 0, (2, 2, 1, 1), (2, 2, 1, 1), False),
    ("be", 1, 0, (2, 2, 2, 1), (2, 2, 2, 1), False),
    ("bs", 0, 1, (3, 2, 2, 2), (3, 2, 2, 2), True),
    ("step", 0, 1, (3, 3, 2, 2), (3, 3, 2, 2), True),
    ("be", 0, 1, (3, 3, 3, 2), (3, 3, 3, 2), True),
    ("ee", (3, 3, 3, 3), (3, 3, 3, 3), True),
    ("end", (3, 3, 3, 3), (3, 3, 3, 3), True),
]
LIGHTNING_EVAL = [
    *LIGHTNING_FIT_VALIDATION,
    *((kind, *row) for kind in ("val", "test", "predict") for row in LIGHTNING_PASS),
]


def test_evaluation_loops_count_their_pass_as_lightning(tmp_path: Path) -> None:
    record = EvalRecord()

    class Reading(Net):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            record.row(self.trainer, "val", "step", batch_idx, dataloader_idx)

        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            record.row(self.trainer, "test", "step", batch_idx, dataloader_idx)

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            record.row(self.trainer, "predict", "step", batch_idx, dataloader_idx)
            return super().predict_step(batch, batch_idx)

    trainer, module = _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=1, callbacks=[record]), Reading()
    assert _counts(trainer.test_loop.batch_progress.current) == (0, 0, 0, 0)  # as Lightning's, before a test
    record.in_fit = True
    trainer.fit(module, _loader(2), _loader(2))
    record.in_fit = False
    trainer.validate(module, [_loader(2), _loader(1)])
    trainer.test(module, [_loader(2), _loader(1)])
    trainer.predict(module, [_loader(2), _loader(1)])
    assert record.rows == LIGHTNING_EVAL
    # after each stage, its pass
    for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
        assert _counts(loop.batch_progress.current) == _counts(loop.batch_progress.total) == (3, 3, 3, 3)
    assert trainer.test_loop.dataloaders == trainer.test_dataloaders


def test_fit_loop_max_epochs_extends_a_resumed_fit(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(Net(), _loader(2))
    checkpoint = trainer.save_checkpoint(tmp_path / "ckpt")
    again = _trainer(tmp_path, max_epochs=1)
    again.fit_loop.max_epochs = 3  # Lightning users' way to train further before resuming
    assert again.max_epochs == 3
    again.fit(Net(), _loader(2), ckpt_path=checkpoint)
    assert (again.current_epoch, again.global_step) == (3, 6)
    again.fit_loop.epoch_loop.max_steps = 10
    assert again.max_steps == again.fit_loop.max_steps == 10
    for bad in (-2, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"max_epochs={bad!r} must be an int >= -1"):
            again.fit_loop.max_epochs = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="max_steps=-5 must be an int >= -1"):
        again.fit_loop.epoch_loop.max_steps = -5
    with pytest.raises(AttributeError):
        again.fit_loop.epoch_progress = None  # type: ignore[misc]


class _LowersMaxSteps(Callback):
    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 2:
            trainer.fit_loop.epoch_loop.max_steps = 3


def test_max_steps_assigned_mid_epoch_stops_the_fit_there(tmp_path: Path) -> None:
    # Lightning 2.6.6 (CPU): epoch_loop.max_steps = 3 in on_train_batch_end at step 2 of a 10-batch
    # epoch ends the fit at global_step 3 ("`Trainer.fit` stopped: `max_steps=3` reached.").
    module = Net()
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[_LowersMaxSteps()])  # fmt: skip
    trainer.fit(module, _loader(10))
    assert trainer.global_step == 3
    assert module.layer.weight.grad is not None  # the fit's last step keeps its gradients (Epoch.frees)
