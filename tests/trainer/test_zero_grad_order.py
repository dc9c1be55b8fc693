"""Automatic optimisation zeroes the gradients as Lightning 2.6.6 does: on the first batch of an
accumulation window, after ``training_step`` and before its backward pass (also when it returned
None), so a step's gradients live until then; a step whose ``training_step`` returned None runs
``on_before_optimizer_step`` and clipping, in both the Trainer's and a module's ``optimizer_step``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback
from ember.precision import MixedPrecision


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))


def _trainer(tmp_path: Path, precision: str = "32-true", **kwargs: Any) -> Trainer:
    # A scale of 1 to start: on the CPU, float16 gradients would overflow at torch's default scale.
    plugins = (
        [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))]
        if precision == "16-mixed"
        else None
    )
    return Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, plugins=plugins,
                   precision=None if plugins else precision, **kwargs)  # fmt: skip


class _Calls(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_before_zero_grad(self, trainer: Trainer, module: TrainModule, optimizer: Any) -> None:
        self.calls.append("cb.before_zero_grad")

    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        grad = module.layer.weight.grad  # a callback logging gradient norms here sees the step's
        self.calls.append(f"cb.end:{batch_idx}, {grad is not None and bool(grad.abs().sum() > 0)}")


class _Recorded(TrainModule):
    """Records the step hooks; ``training_step`` returns None at ``none_at``."""

    def __init__(self, none_at: int, calls: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.none_at, self.calls = none_at, calls

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls.append(f"training_step:{batch_idx}")
        return None if batch_idx == self.none_at else F.mse_loss(self.layer(batch[0]), batch[1])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.calls.append(f"batch_start:{batch_idx}")

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.calls.append("before_backward")

    def on_after_backward(self) -> None:
        self.calls.append("after_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.calls.append(f"before_opt_step:{self.layer.weight.grad is not None}")

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.calls.append("before_zero_grad")

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        self.calls.append(f"optimizer_zero_grad:{batch_idx}")
        optimizer.zero_grad()

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any, gradient_clip_algorithm: Any
    ) -> None:
        self.calls.append(f"configure_gradient_clipping:{gradient_clip_val}")
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OwnStep(_Recorded):
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        self.calls.append(f"optimizer_step:{batch_idx}")
        optimizer.step(closure=optimizer_closure)


# Recorded with Lightning 2.6.6 (32-true, CPU): the same module, callback and data, 4 batches of 4.
_ZERO = ["cb.before_zero_grad", "before_zero_grad"]
_BACKWARD = ["before_backward", "after_backward"]
_LIGHTNING = {
    # training_step returns None at batch 1, no accumulation, no clipping value
    (1, 1, False, None): [
        "batch_start:0", "training_step:0", *_ZERO, "optimizer_zero_grad:0", *_BACKWARD, "before_opt_step:True",
        "configure_gradient_clipping:None", "cb.end:0, True",
        "batch_start:1", "training_step:1", *_ZERO, "optimizer_zero_grad:1", "before_opt_step:False",
        "configure_gradient_clipping:None", "cb.end:1, False",
        "batch_start:2", "training_step:2", *_ZERO, "optimizer_zero_grad:2", *_BACKWARD, "before_opt_step:True",
        "configure_gradient_clipping:None", "cb.end:2, True",
        "batch_start:3", "training_step:3", *_ZERO, "optimizer_zero_grad:3", *_BACKWARD, "before_opt_step:True",
        "configure_gradient_clipping:None", "cb.end:3, True",
    ],
    # the module's optimizer_step, gradient_clip_val=1.0: clipping on the None step too
    (1, 1, True, 1.0): [
        "batch_start:0", "optimizer_step:0", "training_step:0", *_ZERO, "optimizer_zero_grad:0", *_BACKWARD,
        "before_opt_step:True", "configure_gradient_clipping:1.0", "cb.end:0, True",
        "batch_start:1", "optimizer_step:1", "training_step:1", *_ZERO, "optimizer_zero_grad:1",
        "before_opt_step:False", "configure_gradient_clipping:1.0", "cb.end:1, False",
        "batch_start:2", "optimizer_step:2", "training_step:2", *_ZERO, "optimizer_zero_grad:2", *_BACKWARD,
        "before_opt_step:True", "configure_gradient_clipping:1.0", "cb.end:2, True",
        "batch_start:3", "optimizer_step:3", "training_step:3", *_ZERO, "optimizer_zero_grad:3", *_BACKWARD,
        "before_opt_step:True", "configure_gradient_clipping:1.0", "cb.end:3, True",
    ],
    # accumulate_grad_batches=2, None on a window's first batch: it zeroes all the same
    (2, 2, True, 1.0): [
        "batch_start:0", "training_step:0", *_ZERO, "optimizer_zero_grad:0", *_BACKWARD, "cb.end:0, True",
        "batch_start:1", "optimizer_step:1", "training_step:1", *_BACKWARD, "before_opt_step:True",
        "configure_gradient_clipping:1.0", "cb.end:1, True",
        "batch_start:2", "training_step:2", *_ZERO, "optimizer_zero_grad:2", "cb.end:2, False",
        "batch_start:3", "optimizer_step:3", "training_step:3", *_BACKWARD, "before_opt_step:True",
        "configure_gradient_clipping:1.0", "cb.end:3, True",
    ],
    # accumulate_grad_batches=2, None on a window's last batch: the step has the first batch's gradients
    (1, 2, False, None): [
        "batch_start:0", "training_step:0", *_ZERO, "optimizer_zero_grad:0", *_BACKWARD, "cb.end:0, True",
        "batch_start:1", "training_step:1", "before_opt_step:True", "configure_gradient_clipping:None",
        "cb.end:1, True",
        "batch_start:2", "training_step:2", *_ZERO, "optimizer_zero_grad:2", *_BACKWARD, "cb.end:2, True",
        "batch_start:3", "training_step:3", *_BACKWARD, "before_opt_step:True", "configure_gradient_clipping:None",
        "cb.end:3, True",
    ],
}  # fmt: skip


@pytest.mark.parametrize(("none_at", "accumulate", "own_step", "clip"), list(_LIGHTNING))
def test_the_step_hooks_and_the_gradients_lifetime_are_lightnings(
    tmp_path: Path, none_at: int, accumulate: int, own_step: bool, clip: float | None
) -> None:
    calls: list[str] = []
    module = (_OwnStep if own_step else _Recorded)(none_at, calls)
    trainer = _trainer(
        tmp_path, accumulate_grad_batches=accumulate, gradient_clip_val=clip, callbacks=[_Calls(calls)]
    )
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    assert calls == _LIGHTNING[(none_at, accumulate, own_step, clip)]
    assert trainer.global_step == 4 // accumulate


class _Plain(TrainModule):
    def __init__(self, none_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.none_at = none_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx == self.none_at else F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _ZeroesItself(_Plain):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        optimizer.zero_grad()  # the prepared optimizer's, called inside an accumulation window


class _StepsItself(_Plain):
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("module_cls", [_Plain, _ZeroesItself, _StepsItself])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_accumulated_windows_train_as_a_plain_loop(tmp_path: Path, module_cls: type, precision: str) -> None:
    # Zeroed on each window's first batch, inside the window (bf16-mixed: the prepared optimizer's
    # zero_grad, which does nothing there for loops that call it every batch): no window's
    # gradients leak into the next.
    data = _data()
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for window in range(2):
        optimizer.zero_grad()
        for i in (2 * window, 2 * window + 1):
            x, y = data[4 * i : 4 * i + 4]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                out = plain(x)
            (F.mse_loss(out.float(), y) / 2).backward()
        optimizer.step()
    module = module_cls()
    trainer = _trainer(tmp_path, precision, accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    torch.testing.assert_close(module.layer.weight.detach(), plain.weight.detach())


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("module_cls", [_Plain, _StepsItself])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_clipping_a_step_without_gradients_changes_nothing(
    tmp_path: Path, module_cls: type, precision: str, algorithm: str
) -> None:
    # As Lightning's: the None step (batch 1, its gradients zeroed, none computed) is clipped all the same.
    module = module_cls(none_at=1)
    weights: list[torch.Tensor] = []
    trainer = _trainer(tmp_path, precision, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm,
                       callbacks=[_Weights(weights)])  # fmt: skip
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    assert trainer.global_step == 4
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


class _Weights(Callback):
    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.weights = weights

    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.weights.append(module.layer.weight.detach().clone())


@pytest.mark.parametrize("module_cls", [_Plain, _StepsItself])
def test_a_16_mixed_none_step_closing_a_window_leaves_the_next_window_unscaled_once(
    tmp_path: Path, module_cls: type
) -> None:
    # training_step returns None on the last batch of the first window (its first batch has
    # gradients), with clipping set: the next window's gradients are unscaled as usual before its
    # step. (A scale of 1024: gradients left scaled would move the weights a thousand times as far.)
    module = module_cls(none_at=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                      gradient_clip_val=100.0, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    before = module.layer.weight.detach().clone()
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    assert trainer.global_step == 2
    assert (module.layer.weight.detach() - before).abs().max() < 1.0


class _Sees(_Plain):
    """Records, in training_step and after the fit, whether the weight holds gradients."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.seen.append(f"step:{batch_idx}:{self.layer.weight.grad is not None}")
        return super().training_step(batch, batch_idx)


class _SeesStart(_Sees):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(f"start:{batch_idx}")


class _GradsAtEnd(Callback):
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append(f"end:{batch_idx}:{module.layer.weight.grad is not None}")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_a_step_where_no_hook_before_the_next_backward_sees_them(
    tmp_path: Path, accumulate: int
) -> None:
    # Nothing between a step's on_train_batch_end and the next backward can look (no
    # on_train_batch_start, on_before_zero_grad, optimizer_zero_grad): the gradients are freed after
    # the batch, as PyTorch's step(); zero_grad(). on_train_batch_end still sees them, and the fit's
    # last step keeps them, as Lightning's; only the next training_step finds none.
    seen: list[str] = []
    module = _Sees(seen)
    trainer = _trainer(tmp_path, accumulate_grad_batches=accumulate, callbacks=[_GradsAtEnd(seen)])
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    if accumulate == 1:
        assert seen == ["step:0:False", "end:0:True", "step:1:False", "end:1:True",
                        "step:2:False", "end:2:True", "step:3:False", "end:3:True"]  # fmt: skip
    else:  # inside a window the first batch's gradients are there, as in any loop
        assert seen == ["step:0:False", "end:0:True", "step:1:True", "end:1:True",
                        "step:2:False", "end:2:True", "step:3:True", "end:3:True"]  # fmt: skip
    assert module.layer.weight.grad is not None  # the last step's, after the fit
    # With on_train_batch_start overridden, Lightning's order: the next training_step sees them.
    seen.clear()
    trainer = _trainer(tmp_path, callbacks=[_GradsAtEnd(seen)])
    trainer.fit(_SeesStart(seen), DataLoader(_data(), batch_size=4))
    assert seen[3:6] == ["start:1", "step:1:True", "end:1:True"]
    # The same weights either way.
    a, b = _Sees([]), _SeesStart([])
    _trainer(tmp_path).fit(a, DataLoader(_data(), batch_size=4))
    _trainer(tmp_path).fit(b, DataLoader(_data(), batch_size=4))
    torch.testing.assert_close(a.layer.weight.detach(), b.layer.weight.detach())


class _SeesAtTransfer(_Sees):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.seen.append(f"transfer:{self.layer.weight.grad is not None}")
        return batch


def test_a_batch_transfer_hook_sees_the_last_steps_gradients_as_in_lightning(tmp_path: Path) -> None:
    # Lightning 2.6.6 (CPU): the next batch's on_after_batch_transfer runs before the next window's
    # zero_grad, so it sees the step's gradients ([False, True, True] over 3 batches): the gradients
    # are not freed early when a batch-transfer hook (module's or DataModule's) is overridden.
    seen: list[str] = []
    _trainer(tmp_path).fit(_SeesAtTransfer(seen), DataLoader(_data(), batch_size=4))
    assert [s for s in seen if s.startswith("transfer")][:3] == [
        "transfer:False",
        "transfer:True",
        "transfer:True",
    ]
