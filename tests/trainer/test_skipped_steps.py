"""Optimizer steps that are skipped (the grad scaler's for inf/NaN gradients, a closure that returns
None), counted and hooked as Lightning 2.6.6 does it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.precision import MixedPrecision


def _fit(tmp_path: Path, module: TrainModule, precision: str) -> Trainer:
    # A scale of 1 to start: on the CPU, float16 gradients would overflow at torch's default scale.
    plugins = (
        [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))]
        if precision == "16-mixed"
        else None
    )
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, non_finite=None,
                      plugins=plugins, precision=None if plugins else precision)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))
    trainer.fit(module, DataLoader(data, batch_size=4))  # 4 batches
    return trainer


class _Manual(TrainModule):
    """Manual optimisation; batch 1's loss is infinite (``inf_at``) or its closure returns None."""

    automatic_optimization = False

    def __init__(self, closure: bool = False, inf_at: int = -1, none_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.closure, self.inf_at, self.none_at = closure, inf_at, none_at
        self.events: list[tuple[str, bool]] = []

    def _loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        return loss * float("inf") if batch_idx == self.inf_at else loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        before = self.layer.weight.detach().clone()
        if self.closure:

            def closure() -> torch.Tensor | None:
                opt.zero_grad()
                loss = self._loss(batch, batch_idx)
                self.manual_backward(loss)
                return None if batch_idx == self.none_at else loss

            opt.step(closure)
        else:
            opt.zero_grad()
            self.manual_backward(self._loss(batch, batch_idx))
            opt.step()
        self.events.append(("stepped", not torch.equal(before, self.layer.weight)))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # The gradients are unscaled by then (16-mixed): the finite ones are the plain loss's.
        self.events.append(("hook", bool(self.layer.weight.grad.isfinite().all())))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("closure", [False, True])
def test_manual_a_step_the_scaler_skips_is_hooked_and_counted(tmp_path: Path, closure: bool) -> None:
    module = _Manual(closure=closure, inf_at=1)
    trainer = _fit(tmp_path, module, "16-mixed")
    assert trainer.global_step == 4  # as Lightning: each optimizer.step() call is a step
    assert module.events == [
        ("hook", True), ("stepped", True),
        ("hook", False), ("stepped", False),  # inf gradients: the hook runs, the scaler skips the step
        ("hook", True), ("stepped", True),
        ("hook", True), ("stepped", True),
    ]  # fmt: skip


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_manual_a_closure_that_returns_none_still_steps(tmp_path: Path, precision: str) -> None:
    # As Lightning in manual optimisation: the backward pass ran, whatever the closure returns.
    module = _Manual(closure=True, none_at=1)
    trainer = _fit(tmp_path, module, precision)
    assert trainer.global_step == 4
    assert module.events == [("hook", True), ("stepped", True)] * 4


class _Automatic(TrainModule):
    """Automatic optimisation with its own optimizer_step; training_step returns None at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.steps: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx == 1 else F.mse_loss(self.layer(batch[0]), batch[1])

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        before = self.layer.weight.detach().clone()
        optimizer.step(closure=optimizer_closure)
        self.steps.append(not torch.equal(before, self.layer.weight))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_automatic_a_batch_whose_training_step_returns_none_counts_as_a_step_that_changes_nothing(
    tmp_path: Path, precision: str
) -> None:
    module = _Automatic()
    trainer = _fit(tmp_path, module, precision)
    # Lightning 2.6.6 (its optimizer_step overridden so, 32-true and bf16-mixed): global_step 4
    assert module.steps == [True, False, True, True] and trainer.global_step == 4


class _Plain(TrainModule):
    """Automatic optimisation, Lightning's own step; training_step returns None at ``none_at``."""

    def __init__(self, none_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.none_at, self.events = none_at, []  # type: list[Any]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx == self.none_at else F.mse_loss(self.layer(batch[0]), batch[1])

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.events.append(("before_step", self.layer.weight.grad is not None))

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.events.append(("before_zero_grad",))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.events.append(("end", self.trainer.global_step, self.layer.weight.detach().clone()))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        halve = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": halve, "interval": "step"}}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_automatic_training_step_returning_none_is_a_step_boundary_as_lightning(
    tmp_path: Path, precision: str
) -> None:
    module = _Plain(none_at=1)
    trainer = _fit(tmp_path, module, precision)
    # Lightning 2.6.6, the same module (32-true; bf16-mixed on its CPU): global_step 1, 2, 3, 4 after
    # the batches; on_before_zero_grad at each, after training_step, then on_before_optimizer_step
    # (no gradient at batch 1: zeroed, none computed); the weights unchanged by batch 1 (momentum
    # too: no gradient, no update); the step-interval scheduler stepped 4 times (lr 0.1 / 2**4).
    hooks = [e for e in module.events if e[0] != "end"]
    assert hooks == [("before_zero_grad",), ("before_step", True), ("before_zero_grad",), ("before_step", False),
                     ("before_zero_grad",), ("before_step", True), ("before_zero_grad",), ("before_step", True)]  # fmt: skip
    ends = [e for e in module.events if e[0] == "end"]
    assert [e[1] for e in ends] == [1, 2, 3, 4] and trainer.global_step == 4
    assert torch.equal(ends[0][2], ends[1][2]) and not torch.equal(ends[1][2], ends[2][2])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 2**4)


def test_automatic_none_at_the_end_of_an_accumulation_window_steps_with_its_gradients(tmp_path: Path) -> None:
    # As Lightning 2.6.6 (32-true): the window's first batch backpropagated; its last returned None;
    # the step runs with the first batch's gradient (of loss / 2), and is counted.
    module = _Plain(none_at=1)
    trainer = Trainer(default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 1)
    (F.mse_loss(plain(data[:4][0]), data[:4][1]) / 2).backward()
    torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9).step()
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 1
    torch.testing.assert_close(module.layer.weight.detach(), plain.weight.detach())


class _NoBackward(_Manual):
    """At batch 1 the step has no gradients at all: neither backward nor loss."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx != 1:
            return super().training_step(batch, batch_idx)
        opt = self.optimizers()
        opt.zero_grad()  # (set to None)
        opt.step(lambda: None)
        return None

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.events.append(("hook", self.layer.weight.grad is not None))


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_manual_a_step_without_gradients_changes_nothing(tmp_path: Path, precision: str) -> None:
    # torch's optimizers leave a parameter without a gradient as it is; the grad scaler, which
    # would fail to find one to check, is not asked.
    module = _NoBackward(closure=True)
    trainer = _fit(tmp_path, module, precision)
    assert trainer.global_step == 4
    assert (
        module.events
        == [("hook", True), ("stepped", True), ("hook", False)] + [("hook", True), ("stepped", True)] * 2
    )


class _InfAutomatic(_Automatic):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        return loss * float("inf") if batch_idx == 1 else loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.steps.append(False)  # (a marker: the hook ran)


def test_automatic_a_step_the_scaler_skips_is_hooked_and_counted(tmp_path: Path) -> None:
    module = _InfAutomatic()
    trainer = _fit(tmp_path, module, "16-mixed")
    assert trainer.global_step == 4  # as Lightning
    assert module.steps == [False, True, False, False, False, True, False, True]  # hook, then stepped?


class _Closing(_Plain):
    """accumulate_grad_batches=2: training_step returns None on the first window's last batch;
    records the step hooks and whether the scaled gradients were clipped."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.events.append("before_step")

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any, gradient_clip_algorithm: Any
    ) -> None:
        self.events.append("clip")
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_zero_grad(self, optimizer: Any) -> None:
        pass

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _ClosingOwnStep(_Closing):
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("module_cls", [_Closing, _ClosingOwnStep])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_none_closing_an_accumulation_window_steps_as_lightning(
    tmp_path: Path, module_cls: type, precision: str
) -> None:
    # Lightning 2.6.6 (CPU), in both the Trainer's and a module's optimizer_step: on_before_optimizer_step
    # and clipping run at both boundaries; 32-true and bf16-mixed step with the window's first batch's
    # gradients; 16-mixed (MixedPrecision.optimizer_step, its closure's None) neither unscales nor steps
    # nor updates the scaler: the weights are the second window's alone, the scaler updated once.
    data = _fit_data()
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    for window in range(2):
        optimizer.zero_grad()
        batches = [2 * window] if window == 0 else [2, 3]
        if window == 0 and precision == "16-mixed":
            continue
        for i in batches:
            x, y = data[4 * i : 4 * i + 4]
            with torch.autocast("cpu", dtype=dtype, enabled=precision != "32-true"):
                out = plain(x)
            (F.mse_loss(out.float(), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
    module = module_cls(none_at=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if precision == "16-mixed" else None
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                      gradient_clip_val=1.0, plugins=plugins, precision=None if plugins else precision)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert module.events == ["before_step", "clip"] * 2
    torch.testing.assert_close(module.layer.weight.detach(), plain.weight.detach())
    if precision == "16-mixed":
        assert scaler.state_dict()["_growth_tracker"] == 1  # one update: the second window's step


def _fit_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))
