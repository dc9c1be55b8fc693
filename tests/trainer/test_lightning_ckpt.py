"""Lightning ``.ckpt`` files: ``ember convert-lightning`` and ``load_from_checkpoint("model.ckpt")``.

The ``.ckpt`` files are built here with ``torch.save`` in the layout Lightning 2.6 writes
(``lightning/pytorch/trainer/connectors/checkpoint_connector.py``, ``dump_checkpoint``; the ``loops``
entry as its ``ModelCheckpoint`` saves it at the end of a training epoch), from a plain PyTorch loop.
Converted and resumed in ember, the weights equal the plain loop continued: the same numbers a
Lightning fit continued gives (checked by hand against Lightning 2.6.6 on this task).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer
from ember.callbacks import EarlyStopping, Timer
from ember.cli import main
from ember.strategies.checkpoint_io import CheckpointError, read_tree
from ember.trainer import TrainModule
from ember.trainer.checkpointing import STATE


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


class Net(TrainModule):
    def __init__(self, width: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def _plain_epochs(net: Net, opt: torch.optim.Optimizer, sched: Any, epochs: int) -> None:
    for _ in range(epochs):
        for x, y in DataLoader(_data(), batch_size=4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net.net(x), y).backward()
            opt.step()
        sched.step()


def _progress(n: int) -> dict[str, int]:
    return {"ready": n, "completed": n, "started": n, "processed": n}


def _lightning_ckpt(
    path: Path, net: Net, opt: torch.optim.Optimizer, sched: Any, epochs: int = 1, **extra: Any
) -> Path:
    """What Lightning's ModelCheckpoint writes at the end of epoch ``epochs - 1`` (4 batches an epoch)."""
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": 4 * epochs},
        "epoch_loop.batch_progress": {
            "total": _progress(4 * epochs),
            "current": _progress(4),
            "is_last_batch": True,
        },
        "epoch_progress": {
            "total": {**_progress(epochs), "completed": epochs - 1},
            "current": {**_progress(epochs), "completed": epochs - 1},
        },
    }
    checkpoint = {
        "epoch": epochs - 1,
        "global_step": 4 * epochs,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": net.state_dict(),
        "loops": {"fit_loop": fit_loop},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "x.ckpt"}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"width": 4, "lr": 0.1},
        **extra,
    }
    torch.save(checkpoint, path)
    return path


def _trained(tmp_path: Path, **extra: Any) -> tuple[Path, Net, torch.optim.Optimizer, Any]:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _plain_epochs(net, opt, sched, 1)
    return _lightning_ckpt(tmp_path / "model.ckpt", net, opt, sched, **extra), net, opt, sched


def test_a_converted_lightning_checkpoint_resumes_the_fit_exactly(tmp_path: Path) -> None:
    ckpt, net, opt, sched = _trained(tmp_path)
    assert main(["convert-lightning", str(ckpt), str(tmp_path / "conv")]) == 0
    _plain_epochs(net, opt, sched, 2)  # the fit continued: epochs 1 and 2
    trainer = Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    module = Net()
    trainer.fit(module, DataLoader(_data(), batch_size=4), ckpt_path=tmp_path / "conv")
    assert (trainer.global_step, trainer.current_epoch) == (12, 3)
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=0, atol=0)


def test_load_from_checkpoint_reads_a_lightning_ckpt_and_its_conversion(tmp_path: Path) -> None:
    # width 5: the module is rebuilt from the saved hyper-parameters (4-wide layers would not load)
    net = Net(width=5)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    ckpt = _lightning_ckpt(tmp_path / "model.ckpt", net, opt, sched, hyper_parameters={"width": 5, "lr": 0.1})
    main(["convert-lightning", str(ckpt), str(tmp_path / "conv")])
    for source in (ckpt, tmp_path / "conv"):
        module = Net.load_from_checkpoint(source)
        assert module.hparams == {"width": 5, "lr": 0.1}
        torch.testing.assert_close(module.state_dict(), net.state_dict())


class ValNet(Net):
    """Logs val_loss = 1, 2, 3, ... in epochs 0, 1, 2, ...: it never improves after epoch 0."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", float(self.current_epoch + 1))


def test_early_stopping_and_timer_states_carry_over_but_not_model_checkpoint(tmp_path: Path) -> None:
    # The "callbacks" entry as Lightning 2.6.6 writes it after 2 epochs of ValNet's val_loss with
    # EarlyStopping("val_loss", patience=3), Timer() and the default ModelCheckpoint (printed from a
    # real Lightning fit on this task; a Lightning fit in the test would take ~5 s to import).
    states = {
        "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 1, "stopped_epoch": 0,
            "best_score": torch.tensor(1.0), "patience": 3, "stopping_reason": 0,
            "stopping_reason_message": None},
        "Timer": {"time_elapsed": {"train": 30.0, "sanity_check": 0, "validate": 1000.0, "test": 0, "predict": 0}},
        "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
        "'train_time_interval': None}": {"monitor": None, "best_model_path": str(tmp_path / "epoch=1-step=8.ckpt"),
                                         "kth_value": torch.tensor(float("inf"))},
        "EarlyStopping{'monitor': 'acc', 'mode': 'sideways'}": {"wait_count": 1},  # dropped: no such mode
        "EarlyStopping{'monitor': 'acc', 'mode': 'max'}": {"wait_count": "1"},  # dropped: not a state
    }  # fmt: skip
    net = ValNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    ckpt = _lightning_ckpt(tmp_path / "model.ckpt", net, opt, sched, epochs=2, callbacks=states)
    assert main(["convert-lightning", str(ckpt), str(tmp_path / "conv")]) == 0
    stopper, timer = EarlyStopping(monitor="val_loss", mode="min", patience=3), Timer()
    # ModelCheckpoint's state names Lightning's files, which ember's top-k could delete: dropped
    assert read_tree(tmp_path / "conv", STATE)["callbacks"].keys() == {stopper.state_key, timer.state_key}
    trainer = Trainer(max_epochs=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[stopper, timer], num_sanity_val_steps=0, enable_checkpointing=False)  # fmt: skip
    loader = DataLoader(_data(), batch_size=4)
    trainer.fit(ValNet(), loader, loader, ckpt_path=tmp_path / "conv")
    # As the uninterrupted Lightning fit: no improvement after epoch 0, patience 3: stops after epoch 3
    # (without the state: best 3.0 at epoch 2, stopping after epoch 5).
    assert (stopper.best_score, stopper.stopped_epoch, trainer.current_epoch) == (1.0, 3, 4)
    assert type(stopper.best_score) is float and stopper.wait_count == 3
    # Lightning restores the training time only: the validation time is this run's.
    assert 30.0 <= timer.time_elapsed("train") < 1000.0 and timer.time_elapsed("validate") < 1000.0


@dataclasses.dataclass
class Config:
    width: int = 4


def test_a_custom_class_in_the_hyper_parameters_is_refused_without_unpickling(tmp_path: Path) -> None:
    ckpt, *_ = _trained(tmp_path, hyper_parameters={"config": Config()})
    with pytest.raises(SystemExit):
        main(["convert-lightning", str(ckpt), str(tmp_path / "conv")])
    assert not (tmp_path / "conv").exists() and not (tmp_path / ".conv.partial").exists()
    with pytest.raises(CheckpointError, match=r"Config'.*weights_only=True.*plain values"):
        Net.load_from_checkpoint(ckpt)


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, capsys: Any) -> None:
    ckpt, *_ = _trained(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for args, message in [
        ([str(tmp_path / "missing.ckpt"), str(tmp_path / "a")], "is not a file"),
        ([str(tmp_path / "other.pt"), str(tmp_path / "a")], "is not a Lightning checkpoint"),
        ([str(tmp_path / "full" / "notes.txt"), str(tmp_path / "a")], "is not a Lightning checkpoint"),
        ([str(ckpt), str(tmp_path / "full")], "is not empty"),
        ([str(ckpt), str(tmp_path / "full" / "notes.txt")], "is not a directory"),
    ]:
        with pytest.raises(SystemExit):
            main(["convert-lightning", *args])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_a_weights_only_conversion_loads_but_refuses_to_resume(tmp_path: Path) -> None:
    net = Net()
    torch.save(
        {"epoch": 0, "global_step": 4, "state_dict": net.state_dict(), "hyper_parameters": {}},
        tmp_path / "w.ckpt",
    )
    main(["convert-lightning", str(tmp_path / "w.ckpt"), str(tmp_path / "conv")])
    torch.testing.assert_close(Net.load_from_checkpoint(tmp_path / "conv").state_dict(), net.state_dict())
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(CheckpointError, match="weights only .converted from a Lightning"):
        trainer.fit(Net(), DataLoader(_data(), batch_size=4), ckpt_path=tmp_path / "conv")


def test_fit_with_a_ckpt_file_points_at_the_converter(tmp_path: Path) -> None:
    ckpt, *_ = _trained(tmp_path)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(CheckpointError, match="ember convert-lightning"):
        trainer.fit(Net(), DataLoader(_data(), batch_size=4), ckpt_path=ckpt)
