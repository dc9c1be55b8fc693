"""Lightning names ember gained, each checked against what Lightning 2.6 does: the train/eval-mode
hooks around the evaluation loops (``on_validation_model_eval`` ...), ``on_before_zero_grad``,
``TrainModule.backward``, ``TrainModule.strict_loading``, and the Trainer's ``ckpt_path``,
``evaluating``, ``enable_validation``, ``early_stopping_callbacks``, ``num_nodes``, ``device_ids``,
``precision_plugin``, ``scaler``, ``init_module`` and ``print``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import PYTHON, run_command
from torch.utils.data import DataLoader, TensorDataset

from ember import CheckpointError, Trainer, TrainModule
from ember.callbacks import Callback, EarlyStopping


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size
    )


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.dropout = torch.nn.Dropout(0.5)
        self.calls: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.calls.append(("validation_step", self.training, self.dropout.training))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.calls.append(("test_step", self.training))

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls.append(("predict_step", self.training))
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    options = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "enable_checkpointing": False, "num_sanity_val_steps": 0, **kwargs}  # fmt: skip
    return Trainer(default_root_dir=str(tmp_path), **options)


# -- the train/eval-mode hooks -----------------------------------------------------------------------
class MonteCarloDropout(Net):
    """Lightning's recipe for dropout at validation: the eval hook leaves the model training."""

    def on_validation_model_eval(self) -> None:
        self.calls.append("on_validation_model_eval")

    def on_validation_model_train(self) -> None:
        self.calls.append("on_validation_model_train")
        super().on_validation_model_train()

    def on_validation_start(self) -> None:
        self.calls.append("on_validation_start")

    def on_validation_end(self) -> None:
        self.calls.append("on_validation_end")


def test_overriding_the_validation_eval_hook_keeps_dropout_on(tmp_path: Path) -> None:
    module = MonteCarloDropout()
    _trainer(tmp_path, limit_val_batches=1).fit(module, _loader(), _loader())
    # As Lightning: the eval hook before on_validation_start, the train hook after on_validation_end.
    assert module.calls == [
        "on_validation_model_eval", "on_validation_start", ("validation_step", True, True),
        "on_validation_end", "on_validation_model_train",
    ]  # fmt: skip
    assert module.training


def test_validation_puts_each_layer_back_in_its_own_mode(tmp_path: Path) -> None:
    module = Net()
    module.dropout.eval()  # a layer frozen in eval mode (a finetuned backbone's) stays so
    trainer = _trainer(tmp_path, limit_val_batches=1)
    trainer.fit(module, _loader(), _loader())
    assert module.calls == [("validation_step", False, False)]
    assert module.training and module.layer.training and not module.dropout.training
    trainer.validate(module, _loader(), verbose=False)
    assert module.training and not module.dropout.training


def test_test_and_predict_call_their_eval_hooks(tmp_path: Path) -> None:
    class Hooked(Net):
        def on_test_model_eval(self) -> None:
            self.calls.append("on_test_model_eval")  # (not super(): the module stays training)

        def on_test_model_train(self) -> None:
            self.calls.append("on_test_model_train")

        def on_predict_model_eval(self) -> None:
            self.calls.append("on_predict_model_eval")
            super().on_predict_model_eval()

    module = Hooked()
    trainer = _trainer(tmp_path, limit_test_batches=1, limit_predict_batches=1)
    trainer.test(module, _loader(), verbose=False)
    assert module.calls == ["on_test_model_eval", ("test_step", True), "on_test_model_train"]
    module.calls.clear()
    trainer.predict(module, _loader())
    # Predict has no train hook: as Lightning, each layer goes back to the mode it had.
    assert module.calls == ["on_predict_model_eval", ("predict_step", False)]
    assert module.training


# -- on_before_zero_grad -------------------------------------------------------------------------------
def test_on_before_zero_grad_runs_on_callbacks_then_the_module_before_each_zero_grad(tmp_path: Path) -> None:
    calls: list[Any] = []

    class Recorder(Callback):
        def on_before_zero_grad(self, trainer: Trainer, module: TrainModule, optimizer: Any) -> None:
            calls.append(("callback", trainer.global_step, module.layer.weight.grad is not None))

    class Module(Net):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            calls.append("on_before_optimizer_step")

        def on_before_zero_grad(self, optimizer: Any) -> None:
            calls.append(("module", optimizer is self.trainer.optimizers[0]))

    _trainer(tmp_path, accumulate_grad_batches=2, callbacks=[Recorder()]).fit(Module(), _loader())
    # As Lightning's: once per window (4 batches, 2 steps), on its first batch, after training_step and
    # before the backward pass: the last step's gradients are still there (none before the first).
    first = [("callback", 0, False), ("module", True), "on_before_optimizer_step"]
    assert calls == [*first, ("callback", 1, True), ("module", True), "on_before_optimizer_step"]


# -- TrainModule.backward ------------------------------------------------------------------------------
class OwnBackward(Net):
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("backward", float(loss.detach())))
        loss.backward(*args, retain_graph=True, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_module_backward_override_runs_the_backward_pass(tmp_path: Path, accumulate: int) -> None:
    plain, own = Net(), OwnBackward()
    _trainer(tmp_path, accumulate_grad_batches=accumulate).fit(plain, _loader())
    _trainer(tmp_path, accumulate_grad_batches=accumulate).fit(own, _loader())
    # Once a batch, with the loss divided by the accumulation (as Lightning), and the same training.
    losses = [value for name, value in own.calls if name == "backward"]
    assert len(losses) == 4
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    first = next(iter(_loader()))
    assert losses[0] == pytest.approx(float(F.mse_loss(reference(first[0]), first[1]).detach()) / accumulate)
    for a, b in zip(plain.parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_module_backward_gets_the_loss_scaled_by_the_grad_scaler(tmp_path: Path) -> None:
    class Scaled(OwnBackward):
        def on_before_backward(self, loss: torch.Tensor) -> None:
            self.calls.append(("on_before_backward", float(loss.detach())))

    plain, own = Net(), Scaled()
    _trainer(tmp_path, precision="16-mixed").fit(plain, _loader())
    trainer = _trainer(tmp_path, precision="16-mixed")
    trainer.fit(own, _loader())
    # Inside the precision plugin, as Lightning's: the loss it gets is scaled (GradScaler starts at 2**16).
    (_, before), (_, scaled) = own.calls[:2]
    assert scaled == pytest.approx(before * 2.0**16)
    for a, b in zip(plain.parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_manual_backward_goes_through_the_module_backward(tmp_path: Path) -> None:
    class Manual(OwnBackward):
        automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            optimizer = self.optimizers()
            self.manual_backward(F.mse_loss(self.layer(batch[0]), batch[1]))
            optimizer.step()
            optimizer.zero_grad()

    module = Manual()
    _trainer(tmp_path).fit(module, _loader())
    assert [name for name, _ in module.calls] == ["backward"] * 4


# -- strict_loading --------------------------------------------------------------------------------
class Wider(Net):
    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(3, 1)  # not in the checkpoint


def test_strict_loading_false_loads_the_weights_both_have(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit(Net(), _loader())
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    saved = trainer.module.layer.weight.detach().clone()
    with pytest.raises(CheckpointError, match="missing tensors"):
        _trainer(tmp_path).validate(Wider(), _loader(), ckpt_path=path, verbose=False)
    module = Wider()
    module.strict_loading = False
    with pytest.warns(UserWarning, match="extra.weight"):
        _trainer(tmp_path).validate(module, _loader(), ckpt_path=path, verbose=False)
    torch.testing.assert_close(module.layer.weight.detach(), saved)
    with pytest.raises(RuntimeError, match="extra"):
        Wider.load_from_checkpoint(path)
    Wider.strict_loading = False  # (a class attribute, as Lightning allows: strict=None follows it)
    try:
        with pytest.warns(UserWarning, match="extra.weight"):
            loaded = Wider.load_from_checkpoint(path)
        torch.testing.assert_close(loaded.layer.weight.detach(), saved)
    finally:
        del Wider.strict_loading
    module = Wider()
    module.strict_loading = False
    assert not module.strict_loading and Net().strict_loading


def test_load_from_checkpoint_refuses_a_strict_that_contradicts_strict_loading(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit(Net(), _loader())
    path = trainer.save_checkpoint(tmp_path / "ckpt")

    class Loose(Wider):
        def __init__(self) -> None:
            super().__init__()
            self.strict_loading = False

    with pytest.raises(ValueError, match="strict=True"):
        Loose.load_from_checkpoint(path, strict=True)
    with pytest.warns(UserWarning, match="lacks these tensors"):
        assert isinstance(Loose.load_from_checkpoint(path, strict=False), Loose)


# -- Trainer attributes ----------------------------------------------------------------------------------
def test_ckpt_path_names_the_checkpoint_the_last_stage_loaded(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert trainer.ckpt_path is None
    module = Net()
    trainer.fit(module, _loader())
    assert trainer.ckpt_path is None
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    trainer.validate(module, _loader(), ckpt_path=path, verbose=False)
    assert trainer.ckpt_path == str(path)
    trainer.test(module, _loader(), verbose=False)
    assert trainer.ckpt_path is None
    resumed = _trainer(tmp_path, max_epochs=2)
    resumed.fit(Net(), _loader(), ckpt_path=path)
    assert resumed.ckpt_path == str(path)
    with pytest.raises(AttributeError, match="read-only"):
        resumed.ckpt_path = str(path)


def test_evaluating_and_enable_validation(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []

    class Flags(Callback):
        def on_train_batch_start(
            self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
        ) -> None:
            seen.append(("train", trainer.evaluating))

        def on_validation_batch_start(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            seen.append(("sanity" if trainer.sanity_checking else "validation", trainer.evaluating))

        def on_test_batch_start(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            seen.append(("test", trainer.evaluating))

        def on_predict_batch_start(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            seen.append(("predict", trainer.evaluating))

    trainer = _trainer(tmp_path, callbacks=[Flags()], num_sanity_val_steps=1, limit_train_batches=1,
                       limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1)  # fmt: skip
    assert not trainer.enable_validation
    module = Net()
    trainer.fit(module, _loader(), _loader())
    assert trainer.enable_validation and not trainer.evaluating
    trainer.test(module, _loader(), verbose=False)
    trainer.predict(module, _loader())
    assert seen == [
        ("sanity", True),
        ("train", False),
        ("validation", True),
        ("test", True),
        ("predict", False),
    ]
    no_val = _trainer(tmp_path, limit_val_batches=0)
    no_val.fit(Net(), _loader(), _loader())
    assert not no_val.enable_validation


def test_the_plain_attributes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stops = [EarlyStopping(monitor="a"), EarlyStopping(monitor="b")]
    trainer = _trainer(tmp_path, callbacks=stops)
    assert trainer.early_stopping_callbacks == stops
    assert trainer.num_nodes == 1 and trainer.device_ids == [0]
    assert trainer.precision_plugin is trainer.precision is trainer.accelerator.precision
    assert trainer.scaler is None
    with trainer.init_module():
        layer = torch.nn.Linear(2, 2)
    assert layer.weight.device == trainer.accelerator.device
    trainer.print("only on local rank 0")
    assert capsys.readouterr().out == "only on local rank 0\n"
    mixed = _trainer(tmp_path, precision="16-mixed")
    assert isinstance(mixed.scaler, torch.amp.GradScaler) and mixed.scaler is mixed.accelerator.scaler
    with mixed.init_module(empty_init=True):  # (changes nothing off FSDP)
        layer = torch.nn.Linear(2, 2)
    assert layer.weight.device.type != "meta"


DDP_SCRIPT = """
import json, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ember import Trainer, TrainModule

class Model(TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.backwards = 0
    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.layer(batch[0]), batch[1])
    def backward(self, loss, *args, **kwargs):
        self.backwards += 1
        super().backward(loss, *args, **kwargs)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

torch.manual_seed(0)
x = torch.arange(16, dtype=torch.float32).reshape(8, 2) / 8
trainer = Trainer(devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
module = Model()
trainer.fit(module, DataLoader(TensorDataset(x, x.sum(1, keepdim=True) * (1 + torch.arange(8.)[:, None])), batch_size=2))
with open(ROOT + f"/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"backwards": module.backwards, "weight": module.layer.weight.tolist(),
               "device_ids": trainer.device_ids, "num_nodes": trainer.num_nodes}, f)
"""


def test_a_module_backward_under_ddp_keeps_the_gradients_in_sync(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.replace("ROOT", repr(str(tmp_path))))
    result = run_command([PYTHON, str(script)], timeout=180)
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 8 samples, 2 ranks, batches of 2: 2 backward passes each, through the override, gradients averaged
    # across the ranks (their data differ, their weights agree).
    assert [r["backwards"] for r in ranks] == [2, 2]
    assert ranks[0]["weight"] == ranks[1]["weight"]
    assert ranks[0]["device_ids"] == [0, 1] and ranks[0]["num_nodes"] == 1


def test_gradients_are_released_before_each_validation_of_a_fit(tmp_path: Path) -> None:
    class Released(MonteCarloDropout):
        def on_validation_model_zero_grad(self) -> None:
            self.calls.append("on_validation_model_zero_grad")
            super().on_validation_model_zero_grad()

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.layer.weight.grad = torch.ones_like(self.layer.weight)  # after the step's zero_grad

        def on_validation_start(self) -> None:
            self.calls.append(("grad", self.layer.weight.grad is None))

    module = Released()
    _trainer(tmp_path, limit_val_batches=1, val_check_interval=2, limit_train_batches=4).fit(
        module, _loader(), _loader()
    )
    # As Lightning: before each validation run of the fit (mid-epoch and at its end), the module's hook
    # (by default zero_grad(): the gradients are None while validation runs); not in validate().
    first = ["on_validation_model_zero_grad", "on_validation_model_eval", ("grad", True)]
    assert module.calls[:3] == first and module.calls.count("on_validation_model_zero_grad") == 2
    module.calls.clear()
    _trainer(tmp_path, limit_val_batches=1).validate(module, _loader(), verbose=False)
    assert "on_validation_model_zero_grad" not in module.calls
