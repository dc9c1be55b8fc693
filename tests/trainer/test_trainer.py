"""Trainer features and errors, in one process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import CheckpointError, DataModule, Trainer, TrainModule
from ember.callbacks import Callback, EarlyStopping, ModelCheckpoint
from ember.strategies.checkpoint_io import read_manifest
from ember.trainer.optim import parse_optimizers


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


class Regressor(TrainModule):
    def __init__(self, lr: float = 0.1, log_val: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("loss", loss)
        return {"loss": loss, "extra": 1}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.log_val:
            self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", F.mse_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return batch[0][:, 0]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": str(tmp_path),
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**{**defaults, **kwargs})


def _loader(n: int = 16, batch_size: int = 4, **kwargs: Any) -> DataLoader:
    return DataLoader(_data(n), batch_size=batch_size, **kwargs)


# -- bad input ------------------------------------------------------------------------------------------
def test_misspelled_argument_suggests_the_name() -> None:
    with pytest.raises(TypeError, match=r"unexpected argument 'max_epoch'\. Did you mean 'max_epochs'\?"):
        Trainer(max_epoch=3)
    with pytest.raises(TypeError, match="'acumulate_grad_batches'. Did you mean 'accumulate_grad_batches'"):
        Trainer(acumulate_grad_batches=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_epochs": -2}, "max_epochs=-2 must be an int >= -1"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches=0 must be an int >= 1"),
        ({"val_check_interval": 1.5}, r"val_check_interval=1\.5 must be an int >= 1"),
        ({"limit_train_batches": 2.0}, r"limit_train_batches=2\.0 must be an int >= 0"),
        ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm='l1'. Valid choices: 'norm', 'value'"),
        ({"max_time": "forever"}, "max_time='forever' must be 'DD:HH:MM:SS'"),
        ({"precision": "fp7"}, "precision='fp7' is not a known precision"),
        ({"strategy": "dpp"}, "strategy='dpp' is not a known strategy"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(**kwargs)


def test_val_check_interval_larger_than_the_epoch(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, val_check_interval=10, max_epochs=1)
    with pytest.raises(ValueError, match="val_check_interval=10 is larger than the 4 training batches"):
        trainer.fit(Regressor(), _loader(), _loader())
    assert not (tmp_path / "logs").exists()  # refused before training (nothing logged)


def test_validation_counted_in_batches_across_epochs(tmp_path: Path) -> None:
    class Counting(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.validated_at: list[int] = []

        def on_validation_end(self) -> None:
            self.validated_at.append(self.trainer.state.total_batch_idx)

    module = Counting()  # 4 batches per epoch, 3 epochs: validate after batches 6 and 12 only
    trainer = _trainer(tmp_path, max_epochs=3, val_check_interval=6, check_val_every_n_epoch=None,
                       num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, _loader(), _loader(8))
    assert module.validated_at == [6, 12]
    with pytest.raises(ValueError, match=r"check_val_every_n_epoch=None .* must be an int, not 0\.5"):
        Trainer(val_check_interval=0.5, check_val_every_n_epoch=None)


def test_training_step_returning_a_string(tmp_path: Path) -> None:
    class Bad(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return "loss"

    with pytest.raises(TypeError, match="training_step must return a loss tensor.*it returned str"):
        _trainer(tmp_path, max_epochs=1).fit(Bad(), _loader())


def test_monitor_key_never_logged(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(monitor="val_los")])
    with pytest.raises(KeyError, match=r"monitor='val_los'.*could not find 'val_los'.*'val_loss'"):
        trainer.fit(Regressor(), _loader(), _loader())
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[EarlyStopping(monitor="acc")])
    with pytest.raises(KeyError, match=r"EarlyStopping\(monitor='acc'\)"):
        trainer.fit(Regressor(), _loader())


def test_ckpt_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ckpt_path='nowhere' does not exist"):
        _trainer(tmp_path, max_epochs=1).fit(Regressor(), _loader(), ckpt_path="nowhere")
    # "best" without a best checkpoint (none saved yet, or no ModelCheckpoint): Lightning's ValueError.
    with pytest.raises(
        ValueError, match=r"fit\(ckpt_path='best'\): the ModelCheckpoint has no best checkpoint"
    ):
        _trainer(tmp_path, max_epochs=1).fit(Regressor(), _loader(), ckpt_path="best")
    for stage in ("validate", "test", "predict"):
        with pytest.raises(
            ValueError, match=rf"{stage}\(ckpt_path='best'\): the ModelCheckpoint has no best"
        ):
            getattr(_trainer(tmp_path), stage)(Regressor(), _loader(), ckpt_path="best")
        with pytest.raises(ValueError, match=r"ckpt_path='best' needs a ModelCheckpoint"):
            getattr(_trainer(tmp_path, enable_checkpointing=False), stage)(
                Regressor(), _loader(), ckpt_path="best"
            )
    # "last" before there is one (a first run): Lightning's warning, and a fresh start.
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(save_last=True)])
    with pytest.warns(UserWarning, match="ckpt_path='last': there is no last checkpoint in .* yet"):
        trainer.fit(Regressor(), _loader(), ckpt_path="last")
    assert trainer.global_step == 4
    again = _trainer(tmp_path, max_epochs=2, callbacks=[ModelCheckpoint(save_last=True)])
    again.fit(Regressor(), _loader(), ckpt_path="last")  # the second run resumes from it
    assert again.global_step == 8


def test_configure_optimizers_forms() -> None:
    layer = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    assert parse_optimizers(opt) == ([opt], [])
    opts, scheds = parse_optimizers(
        {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}
    )
    assert opts == [opt] and scheds[0].monitor == "val_loss" and scheds[0].interval == "epoch"
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a metric to watch"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": plateau})
    with pytest.raises(ValueError, match="interval='batch' is not valid"):
        parse_optimizers(
            {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "batch", "monitor": "x"}}
        )
    with pytest.raises(TypeError, match="configure_optimizers\\(\\) returned str"):
        parse_optimizers("adam")


# -- features ---------------------------------------------------------------------------------------------
def test_hparams_read_as_attributes_and_come_from_a_dict_or_namespace(tmp_path: Path) -> None:
    import argparse

    module = Regressor(lr=0.5)
    assert module.hparams.lr == module.hparams["lr"] == 0.5  # Lightning's self.hparams.lr
    module.hparams.extra = 3
    assert module.hparams["extra"] == 3
    del module.hparams.extra
    with pytest.raises(AttributeError, match=r"hparams has no 'missing'; it holds \['log_val', 'lr'\]"):
        module.hparams.missing  # noqa: B018

    class FromConfig(Regressor):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.hparams.clear()
            self.save_hyperparameters(config, ignore=["secret"])

    assert FromConfig({"lr": 0.2, "log_val": False, "secret": 1}).hparams == {"lr": 0.2, "log_val": False}
    namespace = FromConfig(argparse.Namespace(lr=0.3, log_val=True))
    assert namespace.hparams == {"lr": 0.3, "log_val": True}
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(namespace, _loader())
    state = json.loads((Path(trainer.checkpoint_callback.best_model_path) / "trainer_state.json").read_text())
    assert state["hyper_parameters"] == {"lr": 0.3, "log_val": True}
    with pytest.raises(TypeError, match="names of __init__ arguments .* got \\[3\\]"):
        Regressor().save_hyperparameters(3)


def test_accelerator_gpu_is_cuda() -> None:
    # Lightning's accelerator="gpu" names CUDA (here without a GPU: the CUDA check answers).
    from ember import Accelerator

    for make in (lambda: Accelerator(accelerator="gpu"), lambda: Trainer(accelerator="gpu")):
        with pytest.raises(
            ValueError, match=r"accelerator='cuda' was requested, but torch.cuda.is_available\(\)"
        ):
            make()
    with pytest.raises(ValueError, match="Valid choices: 'auto', 'cpu', 'cuda', 'gpu', 'xla'"):
        Accelerator(accelerator="tpu")


def test_fit_validate_test_predict(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=1)
    module = Regressor()
    trainer.fit(module, _loader(), _loader())
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert set(trainer.callback_metrics) >= {"loss", "val_loss"}
    assert trainer.validate(dataloaders=_loader())[0].keys() == {"val_loss"}
    test = trainer.test(dataloaders=_loader())
    assert list(test[0]) == ["test_loss"] and test[0]["test_loss"] > 0
    predictions = trainer.predict(dataloaders=_loader(10, 3))
    assert torch.equal(torch.cat(predictions), _data(10).tensors[0][:, 0])
    hparams = json.loads((Path(trainer.log_dir) / "hparams.json").read_text())
    assert hparams == {"lr": 0.1, "log_val": True}
    checkpoint = trainer.checkpoint_callback
    assert checkpoint.last_model_path == "" and Path(checkpoint.best_model_path).name == "epoch=1-step=8"
    state = json.loads((Path(checkpoint.best_model_path) / "trainer_state.json").read_text())
    assert state["hyper_parameters"] == {"lr": 0.1, "log_val": True} and state["loop"]["global_step"] == 8


def test_epoch_values_are_weighted_by_batch_size(tmp_path: Path) -> None:
    class Weighted(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("size", float(batch[0].shape[0]))  # batches of 4, 4, 2: weighted mean = 36/10

    trainer = _trainer(tmp_path, max_epochs=1, logger=False)
    result = trainer.validate(Weighted(), _loader(10, 4))
    assert result[0]["size"] == pytest.approx(3.6)


def test_progress_bar_values_are_converted_only_with_logger_rows(tmp_path: Path) -> None:
    # Converting a device tensor waits for the device (and cuts an XLA graph): the bar shows the
    # values of the last logged step, converted once, not every step's.
    class StepLogger(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("step", float(self.global_step + 1), prog_bar=True)
            return super().training_step(batch, batch_idx)

    class Reader(Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            self.seen.append(trainer.progress_bar_metrics["step"])

    reader = Reader()
    trainer = _trainer(tmp_path, max_epochs=1, log_every_n_steps=5, callbacks=[reader], logger=False)
    trainer.fit(StepLogger(), _loader(48, 4))
    # First read at step 1, then rows at steps 5 and 10 (the epoch's last batch, 12, gets none).
    assert reader.seen == [1.0] * 4 + [5.0] * 5 + [10.0] * 3


def test_repeated_step_values_publish_each_step_and_keep_their_options(tmp_path: Path) -> None:
    # The second and later self.log calls of a name take a short path: the value of every step is
    # still what callbacks, the bar and the logger rows see, across validation runs and epochs; a call
    # with other options, or an invalid one, goes the full way.
    class Steps(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = F.mse_loss(self(batch[0]), batch[1])
            self.log("loss", loss, prog_bar=True)
            self.log("twice", loss * 2, logger=False)
            if self.current_epoch == 1 and batch_idx == 1:
                self.log("loss", loss, on_epoch=True)  # the same name, now aggregated too
            return loss

    class Reader(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[float, float, float]] = []

        def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, *args: Any) -> None:
            metrics = trainer.callback_metrics
            self.seen.append((outputs["loss"].item(), metrics["loss"].item(), metrics["twice"].item()))

    reader = Reader()
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=1, callbacks=[reader], val_check_interval=2)
    trainer.fit(Steps(), _loader(16, 4), _loader(8, 4))
    assert len(reader.seen) == 8
    assert all(loss == logged and twice == 2 * loss for loss, logged, twice in reader.seen)
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("loss")]) for r in rows[1:] if r.split(",")[header.index("loss")]
    ]
    assert "twice" not in header and losses[:4] == pytest.approx([s[0] for s in reader.seen[:4]])
    assert "loss_step" in trainer.callback_metrics  # the call with on_epoch=True took the full path

    class Bad(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = F.mse_loss(self(batch[0]), batch[1])
            self.log("loss", loss, reduce_fx="mean" if batch_idx == 0 else "median")
            return loss

    with pytest.raises(ValueError, match="reduce_fx='median'"):
        _trainer(tmp_path / "bad", max_epochs=1).fit(Bad(), _loader())


def test_limits_fast_dev_run_and_max_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0.5)
    trainer.fit(Regressor(), _loader(), _loader())
    assert trainer.global_step == 6 and trainer.num_val_batches == [2]
    trainer = _trainer(tmp_path, fast_dev_run=True)
    trainer.fit(Regressor(), _loader(), _loader())
    assert trainer.global_step == 1 and trainer.logger.version == ""  # a logger that writes nothing
    trainer = _trainer(tmp_path, max_steps=5, enable_checkpointing=False)
    trainer.fit(Regressor(), _loader())
    assert trainer.global_step == 5 and trainer.current_epoch == 2


def test_without_validation_batches_checkpoints_and_early_stopping_act_at_epoch_end(tmp_path: Path) -> None:
    # limit_val_batches=0 turns validation off while its loader is still given: the epoch-level
    # callbacks act at the end of each training epoch, as without a loader.
    class Rising(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = F.mse_loss(self(batch[0]), batch[1])
            self.log("train_score", float(self.current_epoch), on_step=False, on_epoch=True)
            return loss

    stopper = EarlyStopping(monitor="train_score", mode="min", patience=2)
    trainer = _trainer(tmp_path, max_epochs=6, limit_val_batches=0, callbacks=[stopper])
    trainer.fit(Rising(), _loader(), _loader())
    assert trainer.num_val_batches == [0]
    assert trainer.current_epoch == 3 and stopper.stopped_epoch == 2  # best at epoch 0, 2 worse checks
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["epoch=2-step=12"]  # saved at every epoch end, the newest kept (save_top_k=1)


def test_monitoring_callbacks_see_the_training_epoch_values_with_validation(tmp_path: Path) -> None:
    # With validation once per epoch, at its end, checkpointing and early stopping act at the end of
    # the training epoch (Lightning's rule): a training epoch value, or one the module logs in
    # on_train_epoch_end, is there for them, beside the validation's.
    class EpochMetric(Regressor):
        def on_train_epoch_end(self) -> None:
            self.log("train_score", float(self.current_epoch))

    best = ModelCheckpoint(
        dirpath=tmp_path / "best", monitor="train_score", mode="max", filename="{epoch}-{val_loss:.2f}"
    )
    stopper = EarlyStopping(monitor="train_score", mode="min", patience=1)
    trainer = _trainer(tmp_path, max_epochs=5, callbacks=[best, stopper])
    trainer.fit(EpochMetric(), _loader(), _loader())
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2  # best at epoch 0, one worse check
    assert Path(best.best_model_path).name.startswith("epoch=1-val_loss=")  # both values at hand
    # Validation twice an epoch: after each validation run, as before (the training epoch is not over).
    steps = _trainer(
        tmp_path / "half", max_epochs=1, val_check_interval=0.5, callbacks=[ModelCheckpoint(save_top_k=-1)]
    )
    steps.fit(Regressor(), _loader(), _loader())
    assert sorted(p.name for p in (tmp_path / "half" / "checkpoints").iterdir()) == [
        "epoch=0-step=2",
        "epoch=0-step=4",
    ]
    # Chosen explicitly: after each validation run, where train_score of this epoch does not exist yet.
    late = EarlyStopping(monitor="train_score", check_on_train_epoch_end=False)
    with pytest.raises(KeyError, match="could not find 'train_score'"):
        _trainer(tmp_path / "late", max_epochs=2, callbacks=[late]).fit(EpochMetric(), _loader(), _loader())
    with pytest.raises(TypeError, match=r"save_on_train_epoch_end='yes'\) must be True or False or None"):
        ModelCheckpoint(save_on_train_epoch_end="yes")  # type: ignore[arg-type]


def test_evaluating_after_fit_without_the_module_loads_the_best_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=2)
    module = Regressor()
    trainer.fit(module, _loader(), _loader())
    with torch.no_grad():
        module.layer.weight.zero_()
    with pytest.warns(
        UserWarning, match=r"test\(\) was called without a module after fit: the fit's best checkpoint"
    ):
        trainer.test(dataloaders=_loader())
    assert module.layer.weight.abs().sum() > 0  # as Lightning: the best checkpoint's weights
    with torch.no_grad():
        module.layer.weight.zero_()
    trainer.test(module, dataloaders=_loader())  # the module given: its current weights
    assert module.layer.weight.abs().sum() == 0


def test_load_from_checkpoint_builds_the_module_with_its_weights(tmp_path: Path) -> None:
    loaded_states: list[dict] = []

    class Remembering(Regressor):
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            loaded_states.append(checkpoint)

    trainer = _trainer(tmp_path, max_epochs=2)
    trained = Remembering(lr=0.5)
    trainer.fit(trained, _loader(), _loader())
    path = trainer.checkpoint_callback.best_model_path  # the newest: the end of the fit
    loaded = Remembering.load_from_checkpoint(path)
    assert type(loaded) is Remembering and loaded.hparams == {"lr": 0.5, "log_val": True}
    for (name, value), (other, mine) in zip(
        trained.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(value, mine)
    assert loaded_states[0]["loop"]["global_step"] == 8  # on_load_checkpoint sees the trainer state
    assert Remembering.load_from_checkpoint(path, lr=0.9).hparams.lr == 0.9  # keyword arguments override
    assert Remembering.load_from_checkpoint(path, map_location="meta").layer.weight.is_meta

    class Wider(Regressor):
        def __init__(self, lr: float = 0.1, log_val: bool = True) -> None:
            super().__init__(lr, log_val)
            self.extra = torch.nn.Linear(1, 1)

    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "extra.weight"'):
        Wider.load_from_checkpoint(path)
    assert Wider.load_from_checkpoint(path, strict=False).hparams.lr == 0.5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Regressor.load_from_checkpoint(tmp_path / "nope")
    from ember import Accelerator

    accelerator = Accelerator()
    accelerator.prepare(Regressor())
    accelerator.save_state(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="written by Accelerator.save_state, not by a Trainer"):
        Regressor.load_from_checkpoint(tmp_path / "plain")


def test_min_epochs_and_min_steps_hold_a_stop_back(tmp_path: Path) -> None:
    class Stopper(Callback):  # asks to stop at every batch
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            trainer.should_stop = True

    def fit(**kwargs: Any) -> Trainer:
        trainer = _trainer(
            tmp_path, max_epochs=10, enable_checkpointing=False, callbacks=[Stopper()], **kwargs
        )
        trainer.fit(Regressor(), _loader())  # 4 batches an epoch
        return trainer

    assert fit().global_step == 1  # stops after the first batch
    trainer = fit(min_epochs=2)  # two whole epochs first
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert fit(min_steps=6).global_step == 6  # within the second epoch
    trainer = fit(min_epochs=1, min_steps=6)  # both
    assert trainer.global_step == 6 and trainer.current_epoch == 2  # (the stop ends epoch 1)
    with pytest.raises(ValueError, match="min_epochs=-1 must be an int >= 0"):
        Trainer(min_epochs=-1)


def test_early_stopping_and_top_k(tmp_path: Path) -> None:
    class Plateau(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("metric", float(max(5 - self.current_epoch, 2)))  # improves, then stalls at 2

    checkpoint = ModelCheckpoint(
        monitor="metric", save_top_k=2, filename="{epoch}-{metric:.1f}", save_last=True
    )
    trainer = _trainer(tmp_path, max_epochs=20, callbacks=[EarlyStopping("metric", patience=2), checkpoint])
    trainer.fit(Plateau(), _loader(), _loader())
    assert trainer.current_epoch == 6  # epochs 0..5 ran: best at epoch 3, two more without improvement
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch=3-metric=2.0", "epoch=4-metric=2.0", "last"]  # a tie does not replace
    assert (
        Path(checkpoint.best_model_path).name == "epoch=3-metric=2.0" and checkpoint.best_model_score == 2.0
    )


def test_ckpt_path_last_resumes(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[ModelCheckpoint(save_last=True)])
    trainer.fit(Regressor(), _loader())
    newest, last = tmp_path / "checkpoints" / "epoch=1-step=8", tmp_path / "checkpoints" / "last"
    read_manifest(last)  # complete and verified
    # "last" is the newest checkpoint's files linked, not a second save
    assert (last / "model.safetensors").stat().st_ino == (newest / "model.safetensors").stat().st_ino
    again = _trainer(tmp_path, max_epochs=3, callbacks=[ModelCheckpoint(save_last=True)])
    again.fit(Regressor(), _loader(), ckpt_path="last")
    assert again.global_step == 12 and again.current_epoch == 3


def test_validate_with_ckpt_path_loads_weights(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=1)
    trained = Regressor()
    trainer.fit(trained, _loader())
    fresh = Regressor()
    result = _trainer(tmp_path).validate(
        fresh, _loader(), ckpt_path=trainer.checkpoint_callback.best_model_path
    )
    assert torch.equal(fresh.layer.weight, trained.layer.weight) and "val_loss" in result[0]
    with pytest.raises(CheckpointError, match="not by a Trainer"):
        plain = tmp_path / "plain"
        trainer.accelerator.save_state(plain)
        _trainer(tmp_path, max_epochs=1).fit(Regressor(), _loader(), ckpt_path=str(plain))


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    class TwoOpt(Regressor):
        automatic_optimization = False

        def __init__(self) -> None:
            super().__init__()
            self.other = torch.nn.Linear(3, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            first, second = self.optimizers()
            for optimizer, layer in ((first, self.layer), (second, self.other)):
                loss = F.mse_loss(layer(batch[0]), batch[1])
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            scheduler = self.lr_schedulers()
            scheduler.step()

        def configure_optimizers(self) -> Any:
            a = torch.optim.SGD(self.layer.parameters(), lr=0.1)
            b = torch.optim.SGD(self.other.parameters(), lr=0.1)
            return [a, b], [torch.optim.lr_scheduler.StepLR(a, 1, 0.5)]

    module = TwoOpt()
    before = module.other.weight.detach().clone()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, _loader())
    assert not torch.equal(before, module.other.weight)
    assert trainer.global_step == 8  # 2 optimizer steps per batch, 4 batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**4
    with pytest.raises(ValueError, match="accumulate_grad_batches > 1 needs automatic optimization"):
        _trainer(tmp_path, accumulate_grad_batches=2).fit(TwoOpt(), _loader())


def test_max_time_and_monitors(tmp_path: Path) -> None:
    from ember.callbacks import LearningRateMonitor, ThroughputMonitor

    trainer = _trainer(tmp_path, max_time={"seconds": 0}, max_epochs=5)
    trainer.fit(Regressor(), _loader())
    # As Lightning: the Timer, checked at on_fit_start, stopped the fit before any batch.
    assert trainer.global_step == 0
    monitors = [LearningRateMonitor(), ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0])]
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=2, callbacks=monitors)
    trainer.fit(Regressor(), _loader())
    header = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-SGD", "train/time", "train/batches", "train/samples"} <= set(header)


class Data(DataModule):
    """Training and validation loaders of 16 samples, a test loader of 8; records its setup stages."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def setup(self, stage: str) -> None:
        self.stages.append(stage)

    def train_dataloader(self) -> DataLoader:
        return _loader()

    def val_dataloader(self) -> DataLoader:
        return _loader()

    def test_dataloader(self) -> DataLoader:
        return _loader(8)


def test_reduce_lr_on_plateau_and_datamodule(tmp_path: Path) -> None:
    class Plateau(Regressor):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}

    data = Data()
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(Plateau(), datamodule=data)
    assert data.stages == ["fit"]
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.1


def test_lightning_forms_of_the_entry_points(tmp_path: Path) -> None:
    data, module = Data(), Regressor()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model=module, train_dataloaders=data)  # Lightning's names; a DataModule where loaders go
    assert trainer.global_step == 4 and data.stages == ["fit"] and "val_loss" in trainer.callback_metrics
    assert trainer.datamodule is data and trainer.num_devices == 1 and trainer.node_rank == 0
    assert (
        trainer.checkpoint_callbacks == [trainer.checkpoint_callback]
        and trainer.early_stopping_callback is None
    )
    assert list(trainer.test(model=module, dataloaders=data)[0]) == ["test_loss"]
    assert data.stages == ["fit", "test"]
    with pytest.raises(TypeError, match=r"fit\(\) got both module and model=, two names of one argument"):
        trainer.fit(module, model=module)
    with pytest.raises(
        ValueError, match=r"validate\(\) got a DataModule in place of the dataloaders and datamodule="
    ):
        trainer.validate(module, data, datamodule=data)
    with pytest.raises(TypeError, match=r"fit\(\) needs a module"):
        trainer.fit(train_dataloaders=_loader())


def test_a_module_callback_replaces_the_trainers_of_its_class(tmp_path: Path) -> None:
    class Configured(Regressor):
        def configure_callbacks(self) -> Any:
            return [ModelCheckpoint(dirpath=tmp_path / "mine", monitor="val_loss"), EarlyStopping("val_loss")]

    trainer = _trainer(tmp_path, max_epochs=1)  # with its default ModelCheckpoint
    trainer.fit(Configured(), _loader(), _loader())
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0] is trainer.checkpoint_callback
    assert checkpoints[0].monitor == "val_loss" and not (tmp_path / "checkpoints").exists()
    assert sum(isinstance(c, EarlyStopping) for c in trainer.callbacks) == 1


def test_module_reaches_loggers_prints_and_gathers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ember import CSVLogger

    seen: dict[str, Any] = {}

    class Looking(Regressor):
        def on_train_start(self) -> None:
            seen.update(logger=self.logger, loggers=self.loggers, local_rank=self.local_rank)
            seen["gathered"] = self.all_gather({"x": torch.ones(2)})
            self.print("from the module", self.global_rank)

    module = Looking()
    assert module.logger is None and module.loggers == [] and module.local_rank == 0  # not attached
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _loader())
    assert (
        isinstance(seen["logger"], CSVLogger)
        and seen["loggers"] == trainer.loggers
        and seen["local_rank"] == 0
    )
    assert torch.equal(seen["gathered"]["x"], torch.ones(2))  # one process: as it is
    assert "from the module 0" in capsys.readouterr().out


def test_resume_from_another_directory_leaves_its_log_alone(tmp_path: Path) -> None:
    first = _trainer(tmp_path / "a", max_epochs=1, log_every_n_steps=1)
    first.fit(Regressor(), _loader())
    original = (Path(first.log_dir) / "metrics.csv").read_text()
    elsewhere = _trainer(tmp_path / "b", max_epochs=2, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="logged to"):
        elsewhere.fit(Regressor(), _loader(), ckpt_path=first.checkpoint_callback.best_model_path)
    assert (Path(first.log_dir) / "metrics.csv").read_text() == original
    assert Path(elsewhere.log_dir) == tmp_path / "b" / "logs" / "version_0"


def test_trainer_takes_ember_launch_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_PRECISION", "bf16-mixed")
    assert Trainer().precision.name == "bf16-mixed"
    assert Trainer(precision="32-true").precision.name == "32-true"


def test_module_dataloaders_log_dict_and_validation_schedule(tmp_path: Path) -> None:
    class SelfContained(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.validations = 0

        def train_dataloader(self) -> DataLoader:
            return _loader(32)  # 8 batches

        def val_dataloader(self) -> DataLoader:
            return _loader(8)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log_dict({"a": 1.0, "b": 2.0})

        def on_validation_end(self) -> None:
            self.validations += 1

    module = SelfContained()
    trainer = _trainer(tmp_path, max_epochs=4, val_check_interval=0.5, check_val_every_n_epoch=2,
                       num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module)
    assert module.validations == 4  # epochs 1 and 3 only, twice each (mid-epoch and at the end)
    assert float(trainer.callback_metrics["a"]) == 1.0 and float(trainer.callback_metrics["b"]) == 2.0


def test_deterministic_and_detect_anomaly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NaNLoss(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return (self(batch[0]) * torch.tensor(float("nan"))).sqrt().sum()

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        _trainer(tmp_path, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        # deterministic cuBLAS needs its workspace setting (a CUDA matmul raises without it)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own is kept
        _trainer(tmp_path, deterministic="warn")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match="returned nan"):
        _trainer(tmp_path, detect_anomaly=True, max_epochs=1).fit(NaNLoss(), _loader())
