"""Lightning idioms around the Trainer, checked against what Lightning 2.6 does: ``interrupted``,
``received_sigterm``, ``progress_bar_callback``, ``test_dataloaders``/``predict_dataloaders``, a fit
resumed from a checkpoint at ``max_epochs``, ``TrainModule.dtype``/``device``, and the order of the
DataModule's and module's hooks around the loaders."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import DataModule, Trainer, TrainModule
from ember.callbacks import Callback, RichProgressBar
from ember.data import PreparedDataLoader
from ember.trainer.preemption import Preempted


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


def _loader(n: int = 16) -> DataLoader[Any]:
    return DataLoader(_data(n), batch_size=4)


class Net(TrainModule):
    def __init__(self, fail_at: int | None = None, exception: BaseException | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.fail_at, self.exception = fail_at, exception
        self.calls: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            if self.exception is None:  # SIGTERM to this process: the fit stops at the next boundary
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise self.exception
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.calls.append("validation_step")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_start(self) -> None:
        self.calls.append("on_fit_start")

    def on_train_start(self) -> None:
        self.calls.append("on_train_start")

    def on_train_end(self) -> None:
        self.calls.append("on_train_end")

    def on_fit_end(self) -> None:
        self.calls.append("on_fit_end")


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)  # fmt: skip
    return Trainer(**{**settings, **kwargs})


class SeesInterrupted(Callback):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        self.seen.append(trainer.interrupted)


# -- item 1: interrupted, received_sigterm, progress_bar_callback, test/predict loaders -------------
def test_interrupted_after_an_exception_until_the_next_stage(tmp_path: Path) -> None:
    # Lightning: True from on_exception on, after KeyboardInterrupt and any other exception; False
    # again once a stage runs through. (Lightning turns the KeyboardInterrupt into SystemExit(1);
    # ember lets it propagate: docs/how-to/migrate-from-lightning.md.)
    spy = SeesInterrupted()
    trainer = _trainer(tmp_path, callbacks=[spy])
    assert trainer.interrupted is False
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(Net(fail_at=1, exception=KeyboardInterrupt()), _loader())
    assert trainer.interrupted is True and spy.seen == [True]
    trainer.fit(Net(), _loader())
    assert trainer.interrupted is False
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(Net(fail_at=0, exception=ValueError("boom")), _loader())
    assert trainer.interrupted is True and spy.seen == [True, True]
    trainer.test(Net(), _loader(), verbose=False)
    assert trainer.interrupted is False


def test_received_sigterm(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert trainer.received_sigterm is False
    with pytest.raises(Preempted):  # ember's pre-emption: stopped at the next step boundary
        trainer.fit(Net(fail_at=1), _loader())
    assert trainer.received_sigterm is True and trainer.interrupted is True
    assert trainer.global_step == 2  # (Lightning stops after the same batch)
    trainer.fit(Net(), _loader())
    assert trainer.received_sigterm is False  # each fit starts without


def test_progress_bar_callback(tmp_path: Path) -> None:
    assert _trainer(tmp_path).progress_bar_callback is None
    default = _trainer(tmp_path, enable_progress_bar=True).progress_bar_callback
    assert isinstance(default, RichProgressBar)  # before any stage too, as Lightning's
    mine = RichProgressBar()
    trainer = _trainer(tmp_path, enable_progress_bar=True, callbacks=[mine])
    assert trainer.progress_bar_callback is mine
    trainer.fit(Net(), _loader())
    assert trainer.progress_bar_callback is mine


def test_test_and_predict_dataloaders(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert trainer.test_dataloaders == [] and trainer.predict_dataloaders == []
    module = Net()
    trainer.fit(module, _loader())
    assert trainer.test_dataloaders == []
    trainer.test(module, [_loader(8), _loader(4)], verbose=False)
    assert [len(d) for d in trainer.test_dataloaders] == [2, 1]
    assert all(isinstance(d, PreparedDataLoader) for d in trainer.test_dataloaders)
    trainer.validate(module, _loader(12), verbose=False)  # (neither the test's nor the predict's)
    trainer.predict(module, _loader(12))
    assert [len(d) for d in trainer.predict_dataloaders] == [3]
    assert [len(d) for d in trainer.test_dataloaders] == [2, 1]


# -- item 2: resuming from a checkpoint at max_epochs ------------------------------------------------
def test_resuming_at_max_epochs_trains_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True)
    first.fit(Net(), _loader(), _loader(8))
    checkpoint = first.checkpoint_callback.best_model_path
    capsys.readouterr()
    for max_epochs in (2, 1):  # Lightning: returns; on_fit_start and on_fit_end only; a note
        module = Net()
        resumed = _trainer(tmp_path, max_epochs=max_epochs, enable_checkpointing=True)
        resumed.fit(module, _loader(), _loader(8), ckpt_path=checkpoint)
        assert module.calls == ["on_fit_start", "on_fit_end"]
        assert (resumed.current_epoch, resumed.global_step) == (2, 8)
        assert torch.equal(module.layer.weight, first.module.layer.weight)
        assert f"max_epochs={max_epochs} is reached" in capsys.readouterr().err
    module = Net()
    further = _trainer(tmp_path, max_epochs=3, enable_checkpointing=True)
    further.fit(module, _loader(), _loader(8), ckpt_path=checkpoint)
    assert module.calls[:2] == ["on_fit_start", "on_train_start"] and further.global_step == 12
    assert "trained nothing" not in capsys.readouterr().err


# -- item 4: TrainModule.dtype and .device -------------------------------------------------------------
def test_dtype_and_device_as_lightnings(tmp_path: Path) -> None:
    module = Net()
    assert module.dtype == torch.float32 and module.device == torch.device("cpu")
    assert module.double().dtype == torch.float64
    assert module.to(torch.bfloat16).dtype == torch.bfloat16
    assert module.half().dtype == torch.float16
    module.float()
    module.layer.to(torch.float64)  # a child converted alone: the parameters say so
    assert module.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"dtype is read-only.*\.to\("):
        module.dtype = torch.float16  # type: ignore[misc]
    assert TrainModule().dtype == torch.get_default_dtype()  # no parameters

    seen: list[tuple[torch.dtype, torch.device]] = []

    class Sees(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.append((self.dtype, self.device))
            return super().training_step(batch, batch_idx)

    for precision, dtype in (("64-true", torch.float64), ("bf16-mixed", torch.float32)):
        _trainer(tmp_path, max_steps=1, precision=precision).fit(Sees(), _loader())
        assert seen.pop() == (dtype, torch.device("cpu"))


# -- item 5: the order of the DataModule's and the module's hooks --------------------------------------
class Data(DataModule):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def prepare_data(self) -> None:
        self.calls.append("dm.prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"dm.setup({stage})")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"dm.teardown({stage})")

    def train_dataloader(self) -> DataLoader[Any]:
        self.calls.append("dm.train_dataloader")
        return _loader(8)

    def val_dataloader(self) -> DataLoader[Any]:
        self.calls.append("dm.val_dataloader")
        return _loader(4)

    def test_dataloader(self) -> DataLoader[Any]:
        self.calls.append("dm.test_dataloader")
        return _loader(4)


class Ordered(TrainModule):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls
        self.layer: torch.nn.Module | None = None

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup({stage})")

    def configure_model(self) -> None:
        self.calls.append("configure_model")
        if self.layer is None:  # idempotent, as Lightning asks
            self.layer = torch.nn.Linear(3, 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.calls.append("configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_start(self) -> None:
        self.calls.append("on_fit_start")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.layer is not None
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.calls.append("test_step")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"teardown({stage})")


def test_datamodule_and_module_hooks_in_lightnings_order(tmp_path: Path) -> None:
    calls: list[str] = []
    trainer = _trainer(tmp_path, limit_train_batches=1)
    trainer.fit(Ordered(calls), datamodule=Data(calls))
    # Lightning 2.6: the same, except that it asks for the loaders later (val_dataloader in the
    # sanity check, train_dataloader before on_train_start): ember reads them before
    # configure_optimizers (estimated_stepping_batches, and a resume restores their positions).
    assert calls == [
        "dm.prepare_data", "prepare_data", "dm.setup(fit)", "setup(fit)", "configure_model",
        "dm.train_dataloader", "dm.val_dataloader", "configure_optimizers", "on_fit_start",
        "dm.teardown(fit)", "teardown(fit)",
    ]  # fmt: skip
    calls.clear()
    fresh = Ordered(calls)  # its layers are built by configure_model, in test() as in fit()
    trainer.test(fresh, datamodule=Data(calls), verbose=False)
    assert calls == [
        "dm.prepare_data", "prepare_data", "dm.setup(test)", "setup(test)", "configure_model",
        "dm.test_dataloader", "test_step", "dm.teardown(test)", "teardown(test)",
    ]  # fmt: skip
    assert fresh.layer is not None


class _Dtypes(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.layer(batch[0])
        self.calls.append(str(out.dtype))  # bfloat16 under the autocast of bf16-mixed
        return F.mse_loss(out.float(), batch[1])


def test_plugins_takes_a_precision_plugin_as_lightning_does(tmp_path: Path) -> None:
    from ember.precision import DoublePrecision, MixedPrecision

    quiet = {"default_root_dir": tmp_path, "logger": False, "enable_progress_bar": False, "max_steps": 2}
    module = _Dtypes()
    trainer = Trainer(plugins=[MixedPrecision("bf16-mixed", "cpu")], **quiet)  # (Lightning's positional form)
    trainer.fit(module, _loader())
    assert (
        trainer.precision.name == "bf16-mixed"
        and [c for c in module.calls if c.startswith("torch.")] == ["torch.bfloat16"] * 2
    )
    assert module.layer.weight.dtype == torch.float32
    doubled = Net()
    Trainer(plugins=DoublePrecision(), **quiet).fit(doubled, _loader())  # one plugin, not in a list
    assert doubled.layer.weight.dtype == torch.float64


class ClusterEnvironment:  # (the names of Lightning's plugin kinds pick the hint)
    pass


class SLURMEnvironment(ClusterEnvironment):
    pass


@pytest.mark.parametrize(
    ("plugins", "error", "message"),
    [
        ([SLURMEnvironment()], TypeError, r"instance of SLURMEnvironment.*reads torchrun's, SLURM's"),
        ("bf16-mixed", TypeError, r"'bf16-mixed'.*goes to precision='bf16-mixed'.*Valid choices: an ember"),
        ([object()], TypeError, r"instance of object, which is not a plugin ember takes"),
        ("two", ValueError, r"holds 2 precision plugins: pass one"),
        ("and precision", ValueError, r"precision='64-true' and plugins=.* both set the precision"),
    ],
)
def test_plugins_refuses_what_ember_does_otherwise(plugins: Any, error: type, message: str) -> None:
    from ember.precision import DoublePrecision

    extra: dict[str, Any] = {}
    if plugins == "two":
        plugins = [DoublePrecision(), DoublePrecision()]
    elif plugins == "and precision":
        plugins, extra = DoublePrecision(), {"precision": "64-true"}
    with pytest.raises(error, match=message):
        Trainer(plugins=plugins, **extra)
