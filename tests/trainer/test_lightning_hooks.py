"""Lightning's step and batch-transfer hooks: optimizer_step (with its closure), optimizer_zero_grad,
configure_gradient_clipping, lr_scheduler_step, on_before_batch_transfer, transfer_batch_to_device
and on_after_batch_transfer. Each override changes what the Trainer does, as in Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Accelerator, Trainer, TrainModule
from ember.callbacks import Callback


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    return DataLoader(_data(n), batch_size=batch_size)


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.calls: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls.append(("training_step", batch_idx))
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.calls.append("on_before_optimizer_step")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return batch[0]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, module: TrainModule, loader: Any = None, **kwargs: Any) -> Trainer:
    trainer = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, **{"max_epochs": 1, **kwargs})  # fmt: skip
    trainer.fit(module, loader if loader is not None else _loader())
    return trainer


# -- optimizer_step --------------------------------------------------------------------------------
class Warmup(Net):
    """Lightning's learning-rate warm-up recipe: the rate is changed after each step."""

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        self.calls.append(("optimizer_step", epoch, batch_idx))
        optimizer.step(closure=optimizer_closure)
        self.calls.append("stepped")
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 2) / 4)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_optimizer_step_runs_the_closure_inside_the_users_step(tmp_path: Path, precision: str) -> None:
    module = Warmup()
    trainer = _fit(tmp_path, module, accumulate_grad_batches=2, precision=precision)
    # The closure (training_step, backward, on_before_optimizer_step) runs inside optimizer.step();
    # accumulation micro-steps run without the hook, as in Lightning.
    assert module.calls == [
        ("training_step", 0),
        ("optimizer_step", 0, 1), ("training_step", 1), "on_before_optimizer_step", "stepped",
        ("training_step", 2),
        ("optimizer_step", 0, 3), ("training_step", 3), "on_before_optimizer_step", "stepped",
    ]  # fmt: skip
    assert trainer.global_step == 2
    # global_step counts a step once its hook returned (Lightning's): the second hook saw 1.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.075)
    reference = Net()
    _fit(tmp_path / "plain", reference, accumulate_grad_batches=2, precision=precision)
    # The second step ran at lr 0.05 (set by the first hook): the parameters differ from the plain run's.
    assert not torch.equal(module.layer.weight, reference.layer.weight)


def test_an_optimizer_step_that_only_calls_super_trains_like_the_default(tmp_path: Path) -> None:
    class Plain(Net):
        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            super().optimizer_step(*args, **kwargs)

    module, reference = Plain(), Net()
    _fit(tmp_path / "a", module, max_epochs=2)
    _fit(tmp_path / "b", reference, max_epochs=2)
    assert torch.equal(module.layer.weight, reference.layer.weight)
    assert module.calls == reference.calls


def test_an_optimizer_step_that_skips_the_closure_is_an_error(tmp_path: Path) -> None:
    class Forgetful(Net):
        def optimizer_step(
            self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
        ) -> None:
            optimizer.step()

    with pytest.raises(RuntimeError, match=r"Forgetful.optimizer_step\(\) did not run the closure"):
        _fit(tmp_path, Forgetful())


def test_prepared_optimizer_runs_a_closure_before_a_scaled_step() -> None:
    """Under 16-mixed the scaler acts between backward and step: the closure runs first, once, and
    its loss is returned (torch's GradScaler refuses closures)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    accelerator = Accelerator(precision="16-mixed")
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    runs = []

    def closure() -> torch.Tensor:
        runs.append(1)
        loss = model(torch.full((2, 3), 0.01)).float().pow(2).mean()  # no fp16 overflow at the first scale
        accelerator.backward(loss)
        return loss

    loss = optimizer.step(closure)
    assert len(runs) == 1 and isinstance(loss, torch.Tensor) and not optimizer.step_was_skipped
    assert not torch.equal(model.weight, before)


# -- optimizer_zero_grad, configure_gradient_clipping -----------------------------------------------
def test_optimizer_zero_grad_replaces_the_trainers(tmp_path: Path) -> None:
    class KeepZeros(Net):
        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            self.calls.append(("optimizer_zero_grad", epoch, batch_idx))
            optimizer.zero_grad(set_to_none=False)

        def on_before_backward(self, loss: torch.Tensor) -> None:
            grad = self.layer.weight.grad  # (None before the first backward: zero_grad leaves it so)
            self.calls.append(("before_backward", grad is None or not grad.any()))

    module = KeepZeros()
    _fit(tmp_path, module)
    assert [c for c in module.calls if c[0] == "optimizer_zero_grad"] == [
        ("optimizer_zero_grad", 0, i) for i in range(4)
    ]
    assert [c for c in module.calls if c[0] == "before_backward"] == [("before_backward", True)] * 4
    assert module.layer.weight.grad is not None  # zeroed, not None: set_to_none=False


def test_configure_gradient_clipping_gets_the_trainers_settings(tmp_path: Path) -> None:
    seen = []

    class Clipping(Net):
        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            seen.append((type(optimizer).__name__, gradient_clip_val, gradient_clip_algorithm))
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    module, reference = Clipping(), Net()
    _fit(tmp_path / "a", module, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    _fit(tmp_path / "b", reference, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert seen == [("SGD", 0.01, "value")] * 4
    assert torch.equal(module.layer.weight, reference.layer.weight)  # super() clips as the Trainer does
    unclipped = Net()
    _fit(tmp_path / "c", unclipped)
    assert not torch.equal(module.layer.weight, unclipped.layer.weight)


def test_configure_gradient_clipping_gets_none_for_what_the_trainer_leaves_unset(tmp_path: Path) -> None:
    # As Lightning: the hook gets the Trainer's settings as they are (no gradient_clip_algorithm:
    # None), and clip_gradients given None uses the Trainer's (no algorithm anywhere: "norm").
    seen = []

    class Clipping(Net):
        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            seen.append((gradient_clip_val, gradient_clip_algorithm))
            self.clip_gradients(optimizer)

    for algorithm in (None, "value"):
        seen.clear()
        module, reference = Clipping(), Net()
        trainer = _fit(
            tmp_path / f"{algorithm}", module, gradient_clip_val=0.01, gradient_clip_algorithm=algorithm
        )
        _fit(tmp_path / f"{algorithm}-ref", reference, gradient_clip_val=0.01,
             gradient_clip_algorithm=algorithm or "norm")  # fmt: skip
        assert trainer.gradient_clip_algorithm == algorithm
        assert seen == [(0.01, algorithm)] * 4
        assert torch.equal(module.layer.weight, reference.layer.weight)
    assert Trainer().gradient_clip_algorithm is None
    unset = Clipping()
    _fit(tmp_path / "unset", unset)
    assert seen[-1] == (None, None)
    clipped = Clipping()
    _fit(tmp_path / "clipped", clipped, gradient_clip_val=0.01)
    assert not torch.equal(unset.layer.weight, clipped.layer.weight)  # no value: nothing clipped


def test_configure_gradient_clipping_may_clip_its_own_way(tmp_path: Path) -> None:
    class ClipHard(Net):
        def configure_gradient_clipping(self, optimizer: Any, *args: Any) -> None:
            for p in self.parameters():
                p.grad.zero_()  # the strongest clip: no update at all

    module = ClipHard()
    start = module.layer.weight.detach().clone()
    _fit(tmp_path, module)  # no gradient_clip_val: the hook runs anyway, as in Lightning
    assert torch.equal(module.layer.weight, start)
    with pytest.raises(
        ValueError, match=r"gradient_clip_algorithm='max'\): valid choices are 'norm', 'value'"
    ):
        module.clip_gradients(None, 1.0, "max")


def test_values_logged_in_the_step_hooks_are_step_values(tmp_path: Path) -> None:
    # Everything a training batch runs logs per step by default, the module's step hooks too (as in
    # Lightning): each batch's value is there at its end, not averaged into an epoch value.
    seen: list[tuple[float, float]] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            metrics = trainer.callback_metrics
            seen.append((float(metrics["zeroed_at"]), float(metrics["clipped_at"])))

    class Logging(Net):
        def configure_gradient_clipping(self, optimizer: Any, *args: Any) -> None:
            self.log("clipped_at", float(self.trainer.global_step))

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad()
            self.log("zeroed_at", float(batch_idx))

    trainer = _fit(tmp_path, Logging(), callbacks=[Spy()])
    assert seen == [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]
    assert "zeroed_at_epoch" not in trainer.callback_metrics


# -- lr_scheduler_step -------------------------------------------------------------------------------
class EpochScheduler:
    """A scheduler in timm's manner: not torch's, stepped with the epoch number."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.epochs = optimizer, []

    def step(self, epoch: int) -> None:
        self.epochs.append(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.1 / (epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = list(state["epochs"])


def test_lr_scheduler_step_drives_a_scheduler_that_is_not_torchs(tmp_path: Path) -> None:
    class Timm(Net):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": optimizer, "lr_scheduler": EpochScheduler(optimizer)}

        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            scheduler.step(epoch=self.current_epoch + 1)

    module = Timm()
    trainer = _fit(tmp_path, module, max_epochs=3)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.epochs == [1, 2, 3]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 4)

    class NoStep(Timm):
        lr_scheduler_step = TrainModule.lr_scheduler_step  # not overridden

    with pytest.raises(
        TypeError,
        match=r"EpochScheduler is not a torch LR scheduler .* override the module's lr_scheduler_step",
    ):
        _fit(tmp_path / "b", NoStep())


def test_lr_scheduler_step_gets_the_monitored_value(tmp_path: Path) -> None:
    got = []

    class Plateau(Net):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}

        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            got.append((type(scheduler).__name__, float(metric)))
            super().lr_scheduler_step(scheduler, metric)

    trainer = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, max_epochs=2)  # fmt: skip
    trainer.fit(Plateau(), _loader(), _loader(8))
    assert [name for name, _ in got] == ["ReduceLROnPlateau"] * 2
    assert got[-1][1] == pytest.approx(float(trainer.callback_metrics["val_loss"]))


# -- the batch transfer --------------------------------------------------------------------------------
class Transfers(Net):
    """Doubles the inputs before the transfer, records it, and adds one after it."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.calls.append(("before", dataloader_idx))
        return [batch[0] * 2, batch[1]]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.calls.append(("transfer", device.type, dataloader_idx))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.calls.append(("after", dataloader_idx))
        return [batch[0] + 1, batch[1]]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen = batch[0]


def test_batch_transfer_hooks_run_in_order_for_every_loop(tmp_path: Path) -> None:
    module = Transfers()
    trainer = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, max_epochs=1, limit_train_batches=1,
                      num_sanity_val_steps=0, limit_val_batches=1)  # fmt: skip
    trainer.fit(module, _loader(), [_loader(8), _loader(8)])
    first = _data()[:4][0]
    assert torch.equal(module.seen, first * 2 + 1)  # the batch hooks and the step see the result
    train = module.calls[: module.calls.index(("training_step", 0)) + 1]
    assert train == [("before", 0), ("transfer", "cpu", 0), ("after", 0), ("training_step", 0)]
    val = [c for c in module.calls[len(train) :] if c[0] in ("before", "transfer", "after")]
    two_loaders = [("before", 0), ("transfer", "cpu", 0), ("after", 0)]
    two_loaders += [("before", 1), ("transfer", "cpu", 1), ("after", 1)]
    assert val == two_loaders
    module.calls.clear()
    predictions = trainer.predict(module, [_loader(4), _loader(4)])
    assert torch.equal(predictions[1][0], _data(4)[:][0] * 2 + 1)
    assert module.calls == two_loaders


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        yield from zip(*_data(8)[:], strict=True)


def test_batch_transfer_hooks_with_an_iterable_dataset(tmp_path: Path) -> None:
    class Before(Net):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return [batch[0] * 0, batch[1]]

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            assert not batch[0].any()
            self.calls.append("checked")

    module = Before()
    trainer = _fit(tmp_path, module, DataLoader(Stream(), batch_size=4))
    assert module.calls.count("checked") == 2 and trainer.global_step == 2


# -- steps without batch_idx -----------------------------------------------------------------------------
def test_steps_may_take_the_batch_alone(tmp_path: Path) -> None:
    class BatchOnly(Net):
        def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
            self.calls.append("training_step")
            return F.mse_loss(self.layer(batch[0]), batch[1])

        def validation_step(self, batch: Any) -> None:  # type: ignore[override]
            self.calls.append("validation_step")

    module = BatchOnly()
    _fit(tmp_path, module, _loader())
    assert module.calls.count("training_step") == 4
    trainer = _fit(tmp_path, BatchOnly(), _loader())
    assert trainer.validate(module, _loader(8)) and module.calls.count("validation_step") == 2
    with pytest.raises(
        RuntimeError, match=r"2 val dataloaders, but BatchOnly.validation_step\(\) takes no dataloader_idx"
    ):
        trainer.validate(module, [_loader(8), _loader(8)])

    class BatchAndIndex(BatchOnly):  # as Lightning: a clear error, not a TypeError from the call
        def validation_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
            self.calls.append("validation_step")

    with pytest.raises(
        RuntimeError, match=r"add it, validation_step\(self, batch, batch_idx, dataloader_idx=0\)"
    ):
        trainer.validate(BatchAndIndex(), [_loader(8), _loader(8)])
    # The default steps take any arguments, as Lightning's: several predict loaders need no override.
    assert len(trainer.predict(BatchOnly(), [_loader(8), _loader(8)])) == 2


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_optimizer_step_with_a_skipped_batch(tmp_path: Path, precision: str) -> None:
    class SkipOdd(Warmup):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    trainer = _fit(tmp_path, SkipOdd(), precision=precision)
    # Batches 1 and 3 returned None: no backward, and a step that changes nothing, counted as
    # Lightning 2.6.6 counts it.
    assert trainer.global_step == 4


@pytest.mark.parametrize(
    ("returns_dict", "accumulate"), [(False, 1), (False, 3), (True, 3)], ids=["tensor", "accumulated", "dict"]
)
def test_on_train_batch_end_gets_lightnings_outputs(
    tmp_path: Path, returns_dict: bool, accumulate: int
) -> None:
    # Lightning 2.6.6: always a dict; its "loss" divided by accumulate_grad_batches; the rest as returned.
    seen: list[Any] = []

    class Outputs(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = F.mse_loss(self.layer(batch[0]), batch[1])
            self.losses.append(loss.item())
            return {"loss": loss, "extra": 7.0} if returns_dict else loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            seen.append(outputs)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Outputs()
    _fit(tmp_path, module, _loader(), accumulate_grad_batches=accumulate)
    assert all(type(outputs) is dict and not outputs["loss"].requires_grad for outputs in seen)
    assert [outputs["loss"].item() for outputs in seen] == pytest.approx(
        [x / accumulate for x in module.losses]
    )
    assert all(outputs.get("extra") == (7.0 if returns_dict else None) for outputs in seen)
