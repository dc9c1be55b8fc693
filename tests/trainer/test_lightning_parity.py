"""Lightning idioms a migrating user writes as they are: stage flags, is_last_batch, streaming data,
max_steps inside an epoch, self.log's add_dataloader_idx and rank_zero_only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback, EarlyStopping


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            yield torch.randn(3, generator=g), torch.randn(1, generator=g)


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        t = self.trainer
        self.seen.append(("train", (t.training, t.validating, t.testing, t.predicting, t.is_last_batch)))
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        t = self.trainer
        self.seen.append(("val", (t.training, t.validating, t.sanity_checking)))
        self.log(
            f"val_loss_{dataloader_idx}", F.mse_loss(self.layer(batch[0]), batch[1]), add_dataloader_idx=False
        )

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(("test", (self.trainer.testing, self.trainer.validating)))

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        self.seen.append(("predict", (self.trainer.predicting, self.trainer.training)))
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CountValidation(Callback):
    def __init__(self) -> None:
        self.runs: list[int] = []

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self.runs.append(trainer.global_step)


def trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)  # fmt: skip
    return Trainer(**{**settings, **kwargs})


def test_stage_flags_and_is_last_batch(tmp_path: Path) -> None:
    module = Net()
    fit = trainer(tmp_path, num_sanity_val_steps=1)
    fit.fit(module, DataLoader(_data(12), batch_size=4), DataLoader(_data(4), batch_size=4))
    assert [s for kind, s in module.seen if kind == "train"] == [
        (True, False, False, False, False),
        (True, False, False, False, False),
        (True, False, False, False, True),
    ]
    assert [s for kind, s in module.seen if kind == "val"] == [(False, False, True), (False, True, False)]
    fit.test(module, DataLoader(_data(4), batch_size=4), verbose=False)
    fit.predict(module, DataLoader(_data(4), batch_size=4))
    assert module.seen[-2:] == [("test", (True, False)), ("predict", (True, False))]
    assert not (fit.training or fit.validating or fit.testing or fit.predicting)  # between stages


def test_streaming_data_sizes_schedules_from_max_steps(tmp_path: Path) -> None:
    sized: list[Any] = []

    class Sizing(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            sized.append(self.trainer.estimated_stepping_batches)
            return super().configure_optimizers()

    trainer(tmp_path, max_steps=5, max_epochs=-1).fit(Sizing(), DataLoader(Stream(40), batch_size=4))
    trainer(tmp_path, max_epochs=1).fit(Sizing(), DataLoader(Stream(8), batch_size=4))
    assert sized == [5, float("inf")]  # the second: nothing bounds it


def test_a_float_val_check_interval_on_streaming_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_check_interval=0\.25: a float is a fraction of the epoch"):
        trainer(tmp_path, val_check_interval=0.25).fit(
            Net(), DataLoader(Stream(40), batch_size=4), DataLoader(_data(4), batch_size=4)
        )
    counter = CountValidation()
    trainer(tmp_path, val_check_interval=3, callbacks=[counter]).fit(
        Net(), DataLoader(Stream(40), batch_size=4), DataLoader(_data(4), batch_size=4)
    )
    assert counter.runs == [3, 6, 9]  # every 3 batches


def test_max_steps_inside_an_epoch_runs_no_epoch_end_validation(tmp_path: Path) -> None:
    counter = CountValidation()
    fit = trainer(tmp_path, max_steps=5, callbacks=[counter])
    fit.fit(Net(), DataLoader(_data(40), batch_size=4), DataLoader(_data(4), batch_size=4))
    assert fit.global_step == 5 and counter.runs == []
    counter = CountValidation()
    trainer(tmp_path, max_steps=5, val_check_interval=2, callbacks=[counter]).fit(
        Net(), DataLoader(_data(40), batch_size=4), DataLoader(_data(4), batch_size=4)
    )
    assert counter.runs == [2, 4]  # the mid-epoch ones still run


def test_log_without_the_dataloader_suffix_and_rank_zero_only(tmp_path: Path) -> None:
    fit = trainer(tmp_path)
    loaders = [DataLoader(_data(4), batch_size=4), DataLoader(_data(8), batch_size=4)]
    (first, second) = fit.validate(Net(), loaders, verbose=False)
    assert set(first) == {"val_loss_0"} and set(second) == {"val_loss_1"}

    class RankZero(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("loss", loss, rank_zero_only=True)
            if batch_idx == 2:
                self.log("loss", loss, rank_zero_only=True, sync_dist=True)
            return loss

    with pytest.raises(ValueError, match=r"self\.log\('loss', rank_zero_only=True, sync_dist=True\)"):
        trainer(tmp_path).fit(RankZero(), DataLoader(_data(12), batch_size=4))


def test_settings_under_lightnings_names_and_early_stopping_that_never_stopped(tmp_path: Path) -> None:
    quick = Trainer(fast_dev_run=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    assert (quick.fast_dev_run, quick.limit_train_batches, quick.limit_val_batches, quick.num_sanity_val_steps) == (
        True, 1, 1, 0
    )  # fmt: skip
    stopper = EarlyStopping(monitor="val_loss_0", patience=100)
    fit = trainer(tmp_path, max_epochs=2, min_epochs=1, limit_train_batches=0.5, gradient_clip_val=0.5,
                  gradient_clip_algorithm="value", callbacks=[stopper])  # fmt: skip
    module = Net()
    fit.fit(module, DataLoader(_data(16), batch_size=4), DataLoader(_data(4), batch_size=4))
    assert (fit.min_epochs, fit.min_steps, fit.limit_train_batches, fit.limit_test_batches) == (
        1,
        None,
        0.5,
        1.0,
    )
    assert (fit.gradient_clip_val, fit.gradient_clip_algorithm) == (0.5, "value")
    assert fit.lightning_module is module and fit.global_step == 4  # 2 epochs of half the 4 batches
    assert stopper.stopped_epoch == 0  # it never stopped the fit
