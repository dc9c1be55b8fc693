"""The Trainer's run state against Lightning 2.6's: the stage flags (``training``, ``validating``,
``testing``, ``predicting``, ``evaluating``) from ``setup`` to ``teardown``, ``trainer.state.fn`` /
``stage`` / ``status``, what the sanity check leaves behind (progress bar values, random streams,
its flag after an error), a DataModule's ``on_exception``, ``default_root_dir`` with ``~``,
``num_sanity_val_steps=-1`` and Lightning's ``None`` defaults. The expected rows were recorded from
Lightning 2.6.6."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader
from torch.utils.data import DataLoader

from ember import DataModule, Trainer, TrainModule
from ember.callbacks import Callback


def _loader(n: int = 8) -> DataLoader[Any]:
    return random_loader(n)


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", F.mse_loss(self.layer(batch[0]), batch[1]), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
    return Trainer(**{**settings, **kwargs})


_HOOKS = ("setup", "on_sanity_check_start", "on_train_start", "on_validation_start", "on_train_end",
          "on_fit_end", "on_test_start", "on_predict_start", "teardown")  # fmt: skip


class Flags(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def _row(self, trainer: Trainer, hook: str) -> None:
        state = trainer.state
        flags = (
            trainer.training,
            trainer.validating,
            trainer.testing,
            trainer.predicting,
            trainer.evaluating,
        )
        self.rows.append((hook, state.fn, state.stage, state.status, *flags))


for _hook in _HOOKS:
    setattr(Flags, _hook, lambda self, trainer, *args, _hook=_hook: self._row(trainer, _hook))

# (hook, state.fn, state.stage, state.status, training, validating, testing, predicting, evaluating),
# as Lightning 2.6.6 has them.
_F, _T = False, True
_LIGHTNING_ROWS = [
    ("setup", "fit", "train", "running", _T, _F, _F, _F, _F),
    ("on_sanity_check_start", "fit", "sanity_check", "running", _F, _F, _F, _F, _T),
    ("on_validation_start", "fit", "sanity_check", "running", _F, _F, _F, _F, _T),
    ("on_train_start", "fit", "train", "running", _T, _F, _F, _F, _F),
    ("on_validation_start", "fit", "validate", "running", _F, _T, _F, _F, _T),
    ("on_train_end", "fit", "train", "running", _T, _F, _F, _F, _F),
    ("on_fit_end", "fit", "train", "running", _T, _F, _F, _F, _F),
    ("teardown", "fit", "train", "running", _T, _F, _F, _F, _F),
    ("setup", "validate", "validate", "running", _F, _T, _F, _F, _T),
    ("on_validation_start", "validate", "validate", "running", _F, _T, _F, _F, _T),
    ("teardown", "validate", "validate", "running", _F, _T, _F, _F, _T),
    ("setup", "test", "test", "running", _F, _F, _T, _F, _T),
    ("on_test_start", "test", "test", "running", _F, _F, _T, _F, _T),
    ("teardown", "test", "test", "running", _F, _F, _T, _F, _T),
    ("setup", "predict", "predict", "running", _F, _F, _F, _T, _F),
    ("on_predict_start", "predict", "predict", "running", _F, _F, _F, _T, _F),
    ("teardown", "predict", "predict", "running", _F, _F, _F, _T, _F),
]


def test_stage_flags_and_state_from_setup_to_teardown_as_lightnings(tmp_path: Path) -> None:
    flags = Flags()
    trainer = _trainer(
        tmp_path, callbacks=[flags], limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1
    )
    assert (trainer.state.fn, trainer.state.stage, trainer.state.status) == (None, None, "initializing")
    module = Net()
    trainer.fit(module, _loader(), _loader())
    assert (trainer.state.fn, trainer.state.stage, trainer.state.finished) == ("fit", None, True)
    trainer.validate(module, _loader(), verbose=False)
    trainer.test(module, _loader(), verbose=False)
    trainer.predict(module, _loader())
    assert flags.rows == _LIGHTNING_ROWS
    assert (trainer.state.fn, trainer.state.stage, trainer.state.status) == ("predict", None, "finished")
    assert trainer.state.stopped and not (trainer.training or trainer.predicting)


def test_state_holds_its_fn_stage_and_status_itself(tmp_path: Path) -> None:
    # No reference back to the Trainer: the Trainer writes them into the state as its flags change.
    trainer = _trainer(tmp_path, limit_train_batches=1, num_sanity_val_steps=0)
    module = Net()
    trainer.fit(module, _loader())
    state = trainer.state
    assert not any(isinstance(getattr(state, name, None), Trainer) for name in type(state).__slots__)
    after_fit = copy.copy(state)
    trainer.validate(module, _loader(), verbose=False)
    assert (after_fit.fn, after_fit.stage, after_fit.status) == ("fit", None, "finished")
    assert (state.fn, state.stage, state.status) == ("validate", None, "finished")  # (the live one)
    assert state.state_dict() == after_fit.state_dict() and "fn" not in state.state_dict()


def test_state_status_after_an_exception_and_in_setup(tmp_path: Path) -> None:
    class Fails(Net):
        def setup(self, stage: str) -> None:
            self.device_in_setup = self.device  # (Lightning: the strategy's device already)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise RuntimeError("boom")

    class SeesState(Callback):
        def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
            self.seen = (trainer.state.fn, trainer.state.stage, trainer.state.status)

    seen = SeesState()
    trainer = _trainer(tmp_path, num_sanity_val_steps=0, callbacks=[seen])
    module = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, _loader())
    assert seen.seen == ("fit", "train", "interrupted")  # (Lightning: interrupted before on_exception)
    assert (trainer.state.fn, trainer.state.status, trainer.state.stopped) == ("fit", "interrupted", True)
    assert not trainer.state.finished and trainer.state.stage is None and not trainer.training
    assert module.device_in_setup == trainer.accelerator.device


def test_the_state_is_still_the_loop_counters_and_checkpoints_only_them(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(Net(), _loader())
    assert trainer.state.epoch == 1 and trainer.state.global_step == 2
    assert "fn" not in trainer.state.state_dict() and "status" not in trainer.state.state_dict()


class BarAtTrainStart(Callback):
    def on_sanity_check_end(self, trainer: Trainer, module: TrainModule) -> None:
        self.sanity_bar = trainer.progress_bar_metrics  # (as a progress bar drawing the sanity check)

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.bar, self.callback_metrics = trainer.progress_bar_metrics, dict(trainer.callback_metrics)


def test_the_sanity_checks_values_are_not_shown_in_the_first_epoch(tmp_path: Path) -> None:
    # Lightning 2.6: after the sanity check the three metric dicts are empty; a progress bar
    # reading progress_bar_metrics during the first epoch does not show the sanity check's "val".
    seen = BarAtTrainStart()
    trainer = _trainer(tmp_path, callbacks=[seen], num_sanity_val_steps=1)
    trainer.fit(Net(), _loader(), _loader())
    assert set(seen.sanity_bar) == {"val"}
    assert seen.bar == {} and seen.callback_metrics == {}


def test_default_root_dir_expands_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    trainer = Trainer(default_root_dir="~/runs/../runs2", accelerator="cpu", logger=False)
    # Lightning 2.6 expands "~" and normalizes the path, so nothing is written under a "~" folder.
    assert trainer.default_root_dir == os.path.join(str(tmp_path), "runs2")


def test_num_sanity_val_steps_minus_one_reads_as_infinity(tmp_path: Path) -> None:
    assert _trainer(tmp_path, num_sanity_val_steps=-1).num_sanity_val_steps == float("inf")
    assert _trainer(tmp_path, num_sanity_val_steps=3).num_sanity_val_steps == 3


def test_a_datamodules_on_exception_runs_after_the_callbacks(tmp_path: Path) -> None:
    calls: list[str] = []

    class Data(DataModule):
        def train_dataloader(self) -> DataLoader[Any]:
            return _loader()

        def on_exception(self, exception: BaseException) -> None:
            calls.append(f"datamodule.on_exception({exception})")

        def teardown(self, stage: str) -> None:
            calls.append("datamodule.teardown")

    class Seen(Callback):
        def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
            calls.append("callback.on_exception")

    class Fails(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise RuntimeError("boom")

    trainer = _trainer(tmp_path, callbacks=[Seen()], num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Fails(), datamodule=Data())
    # Lightning 2.6: the callbacks' on_exception, then the DataModule's.
    assert calls == ["callback.on_exception", "datamodule.on_exception(boom)", "datamodule.teardown"]


def test_a_sanity_check_that_failed_leaves_no_flag_behind(tmp_path: Path) -> None:
    class FailsInSanity(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if self.trainer.sanity_checking:
                raise RuntimeError("bad validation_step")
            super().validation_step(batch, batch_idx)

    class StatusAtSetup(Callback):
        statuses: list[str] = []

        def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
            self.statuses.append(trainer.state.status)

    trainer = _trainer(tmp_path, num_sanity_val_steps=1, callbacks=[StatusAtSetup()])
    module = FailsInSanity()
    with pytest.raises(RuntimeError, match="bad validation_step"):
        trainer.fit(module, _loader(), _loader())
    # Lightning 2.6: sanity_checking reads the stage, None after the exception.
    assert not trainer.sanity_checking and trainer.state.stage is None
    assert trainer.state.status == "interrupted"
    # The next stage on the same Trainer validates and logs as usual.
    assert set(trainer.validate(module, _loader(), verbose=False)[0]) == {"val"}
    assert set(trainer.logged_metrics) == {"val"}
    assert StatusAtSetup.statuses == ["running", "running"]  # (not the failed fit's "interrupted")


class Dropout(Net):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(self.drop(batch[0])), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("noise", torch.rand(()))  # the sanity check draws from the generators too


def test_the_sanity_check_leaves_the_random_streams_as_they_were(tmp_path: Path) -> None:
    # Lightning 2.6 runs the sanity check under isolate_rng: with or without it, the fit shuffles
    # and drops out the same, and draws the same afterwards.
    results = []
    for sanity_steps in (0, 2):
        torch.manual_seed(0)
        module = Dropout()
        trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=sanity_steps)
        trainer.fit(module, DataLoader(_loader(32).dataset, batch_size=4, shuffle=True), _loader())
        results.append((module.layer.weight.detach().clone(), torch.rand(3)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_an_error_in_setup_ends_the_stage_interrupted(tmp_path: Path) -> None:
    class FailsInSetup(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            assert self.trainer.training and self.trainer.state.stage == "train"  # (as Lightning's)
            raise ValueError("no optimizer")

    trainer = _trainer(tmp_path, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="no optimizer"):
        trainer.fit(FailsInSetup(), _loader())
    assert trainer.interrupted and trainer.state.status == "interrupted" and not trainer.training


@pytest.mark.parametrize(
    "argument",
    ["limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
     "val_check_interval", "deterministic"],
)  # fmt: skip
def test_lightnings_none_defaults_are_accepted(tmp_path: Path, argument: str) -> None:
    # Lightning 2.6's signature has None for these (a LightningCLI config lists them as null): the default.
    trainer = _trainer(tmp_path, **{argument: None})
    assert getattr(trainer.config, argument) == getattr(_trainer(tmp_path).config, argument)
