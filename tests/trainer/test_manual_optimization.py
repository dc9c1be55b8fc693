"""Manual optimisation as Lightning 2.6.6 runs it: ``on_before_optimizer_step`` after each closure
call of ``opt.step(closure)``, and ``manual_backward``'s extra arguments passed to the backward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


def _fit(tmp_path: Path, module: TrainModule, **kwargs: Any) -> None:
    trainer = Trainer(default_root_dir=str(tmp_path), max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))


class _Closure(TrainModule):
    automatic_optimization = False

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.optimizer = optimizer
        self.events: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()

        def closure() -> torch.Tensor:
            self.events.append("closure")
            opt.zero_grad()
            loss = self.layer(batch[0]).pow(2).mean()
            self.manual_backward(loss)
            return loss

        opt.step(closure)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        has_grads = all(p.grad is not None for p in self.layer.parameters())
        self.events.append("hook with gradients" if has_grads else "hook without gradients")

    def configure_optimizers(self) -> Any:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_on_before_optimizer_step_runs_after_the_closures_backward(tmp_path: Path, precision: str) -> None:
    module = _Closure("sgd")
    _fit(tmp_path, module, precision=precision)
    assert module.events == ["closure", "hook with gradients"] * 2


def test_on_before_optimizer_step_runs_after_each_closure_call_of_lbfgs(tmp_path: Path) -> None:
    module = _Closure("lbfgs")
    _fit(tmp_path, module)
    calls = module.events.count("closure")
    assert calls > 2  # LBFGS evaluated the closure several times a step
    assert module.events == ["closure", "hook with gradients"] * calls


class _ExtraBackwardArgs(TrainModule):
    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.layer(batch[0]).pow(2).mean()
        self.manual_backward(loss, None, True)  # loss.backward(gradient=None, retain_graph=True)
        self.manual_backward(loss, retain_graph=True)  # the graph is still there
        self.manual_backward(loss)
        once = torch.autograd.grad(self.layer(batch[0]).pow(2).mean(), self.layer.weight)[0]
        torch.testing.assert_close(self.layer.weight.grad, 3 * once)
        opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_backward_passes_positional_and_keyword_arguments_to_backward(tmp_path: Path) -> None:
    _fit(tmp_path, _ExtraBackwardArgs())


class _OwnBackward(_ExtraBackwardArgs):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.received.append((args, kwargs))
        loss.backward(*args, **kwargs)


def test_manual_backward_passes_its_arguments_to_the_modules_backward(tmp_path: Path) -> None:
    module = _OwnBackward()
    _fit(tmp_path, module)
    assert module.received[:3] == [((None, True), {}), ((), {"retain_graph": True}), ((), {})]
