"""Lightning's Trainer options: overfit_batches, inference_mode, benchmark, sync_batchnorm and
reload_dataloaders_every_n_epochs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback


def _data(n: int = 16) -> TensorDataset:
    return TensorDataset(torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) / n, torch.ones(n, 1))


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, list[float]]] = []
        self.modes: list[tuple[bool, bool]] = []
        self.loads = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch[0][:, 0].tolist()))
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    return Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                   logger=False, **{"max_epochs": 1, **kwargs})  # fmt: skip


def test_overfit_batches_trains_on_the_same_first_batches(tmp_path: Path) -> None:
    module = Net()
    trainer = _trainer(tmp_path, overfit_batches=2, max_epochs=2, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="overfit_batches is set and the training dataloader shuffles"):
        trainer.fit(
            module, DataLoader(_data(), batch_size=4, shuffle=True), DataLoader(_data(), batch_size=4)
        )
    assert trainer.num_training_batches == 2 and trainer.num_val_batches == [2]
    first = [x / 16 for x in range(0, 12, 3)]  # the first 4 samples, in order
    assert [epoch for epoch, _ in module.seen] == [0, 0, 1, 1]
    assert module.seen[0][1] == module.seen[2][1] == pytest.approx(first)
    assert _trainer(tmp_path, overfit_batches=0.5).config.limit_val_batches == 0.5
    with pytest.raises(ValueError, match=r"overfit_batches=-1 must be an int >= 0"):
        _trainer(tmp_path, overfit_batches=-1)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_inference_mode(tmp_path: Path, inference_mode: bool) -> None:
    module = Net()
    trainer = _trainer(tmp_path, inference_mode=inference_mode)
    trainer.fit(module, DataLoader(_data(), batch_size=4), DataLoader(_data(), batch_size=4))
    trainer.validate(module, DataLoader(_data(8), batch_size=4))
    assert set(module.modes) == {(inference_mode, False)}  # sanity check, fit's validation, validate()


def test_benchmark_sets_cudnn(tmp_path: Path) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        _trainer(tmp_path, benchmark=True)
        assert torch.backends.cudnn.benchmark is True
        _trainer(tmp_path, deterministic=True)  # benchmark=None with deterministic: off
        assert torch.backends.cudnn.benchmark is False
        with pytest.warns(UserWarning, match="benchmark=True lets cuDNN pick"):
            _trainer(tmp_path, benchmark=True, deterministic=True)
    finally:
        torch.backends.cudnn.benchmark = before
        torch.use_deterministic_algorithms(False)


def test_sync_batchnorm(tmp_path: Path) -> None:
    class WithNorm(Net):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self.layer(self.norm(batch[0])), batch[1])

    module = WithNorm()
    _trainer(tmp_path, sync_batchnorm=True).fit(module, DataLoader(_data(), batch_size=4))
    assert isinstance(module.norm, torch.nn.SyncBatchNorm) and module.norm.num_batches_tracked == 4
    # torch's SyncBatchNorm runs on GPUs only: several CPU processes are refused before any starts.
    with pytest.raises(ValueError, match=r"sync_batchnorm=True .* GPUs only, and this run uses several CPU"):
        Trainer(sync_batchnorm=True, accelerator="cpu", devices=2)


class Reloading(Net):
    """Its data comes from train_dataloader(); each call gives a loader of different data."""

    def train_dataloader(self) -> DataLoader:
        self.loads += 1
        return DataLoader(_data(8 * self.loads), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(4), batch_size=4)


@pytest.mark.parametrize(("every", "loads"), [(0, 1), (1, 3), (2, 2)])
def test_reload_dataloaders_every_n_epochs(tmp_path: Path, every: int, loads: int) -> None:
    module = Reloading()
    trainer = _trainer(tmp_path, max_epochs=3, reload_dataloaders_every_n_epochs=every)
    trainer.fit(module)
    assert module.loads == loads
    batches = [sum(1 for e, _ in module.seen if e == epoch) for epoch in range(3)]
    assert batches == {0: [2, 2, 2], 1: [2, 4, 6], 2: [2, 2, 4]}[every]
    assert trainer.num_training_batches == batches[-1]
    # The checkpoints hold the reloaded loaders in the places of the first ones: a resume works.
    resumed = Reloading()
    resumed.loads = loads - 1  # (the data it would have asked for last)
    again = _trainer(tmp_path, max_epochs=4, reload_dataloaders_every_n_epochs=every)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "Checkpoint directory .* is not empty")  # (the first fit's)
        again.fit(resumed, ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert again.current_epoch == 4


def test_gradient_accumulation_scheduler(tmp_path: Path) -> None:
    from ember.callbacks import GradientAccumulationScheduler

    def fit(epochs: int, **kwargs: Any) -> tuple[Trainer, Net]:
        torch.manual_seed(0)
        module = Net()
        trainer = _trainer(tmp_path, max_epochs=epochs, enable_checkpointing=False, **kwargs)
        trainer.fit(module, DataLoader(_data(), batch_size=2))  # 8 batches per epoch
        return trainer, module

    scheduled, module = fit(2, callbacks=[GradientAccumulationScheduler({0: 4, 1: 2})])
    assert scheduled.global_step == 2 + 4
    assert scheduled.accumulate_grad_batches == 2  # the last epoch's, after the fit too (as Lightning)
    scheduled.config.max_epochs = 3  # the same Trainer fits on: its own setting is no conflict
    scheduled.fit(module, DataLoader(_data(), batch_size=2))
    assert scheduled.global_step == 2 + 4 + 4
    _, first_epoch = fit(1, accumulate_grad_batches=4)
    _, then = fit(2, callbacks=[GradientAccumulationScheduler({0: 4, 1: 4})])
    assert not torch.equal(module.layer.weight, then.layer.weight)  # epoch 1 stepped every 2 batches
    _, only_first = fit(1, callbacks=[GradientAccumulationScheduler({0: 4})])
    assert torch.equal(
        only_first.layer.weight, first_epoch.layer.weight
    )  # = Trainer(accumulate_grad_batches=4)
    assert GradientAccumulationScheduler({2: 3}).get_accumulate_grad_batches(1) == 1
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2\) and a GradientAccumulationScheduler"):
        fit(1, accumulate_grad_batches=2, callbacks=[GradientAccumulationScheduler({0: 4})])
    with pytest.raises(ValueError, match=r"0 batches per step \(epoch 1\) must be an int >= 1"):
        GradientAccumulationScheduler({1: 0})


def test_validate_and_test_print_their_results_and_predict_may_keep_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = Net()
    trainer = _trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    capsys.readouterr()
    results = trainer.validate(module, [DataLoader(_data(8), batch_size=4)] * 2)
    out = capsys.readouterr().out
    assert "Validate results" in out and "dataloader 1" in out and "val_loss" in out
    assert f"{results[0]['val_loss/dataloader_idx_0']:.4g}"[:5] in out
    trainer.validate(module, DataLoader(_data(8), batch_size=4), verbose=False)
    assert capsys.readouterr().out == ""
    seen = []

    class Writer(Callback):  # what a prediction writer does: it gets every batch's predictions
        def on_predict_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            seen.append(outputs.shape[0])

    trainer = _trainer(tmp_path, enable_checkpointing=False, callbacks=[Writer()])

    class Predicting(Net):
        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return batch[0]

    assert trainer.predict(Predicting(), DataLoader(_data(8), batch_size=4), return_predictions=False) is None
    assert seen == [4, 4]
    with pytest.raises(TypeError, match=r"predict\(return_predictions=1\) must be True or False or None"):
        trainer.predict(Predicting(), DataLoader(_data(8), batch_size=4), return_predictions=1)  # type: ignore[arg-type]
