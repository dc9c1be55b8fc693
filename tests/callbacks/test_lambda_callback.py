"""LambdaCallback: each keyword's function runs as that hook, with the hook's arguments; an unknown
hook name is refused naming the nearest one; several LambdaCallbacks live in one Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import TrainModule
from ember.callbacks import Callback, LambdaCallback


class Net(TrainModule):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.fail = fail

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_each_function_runs_as_its_hook(tmp_path: Path) -> None:
    calls: list[tuple[Any, ...]] = []
    module = Net()
    callback = LambdaCallback(
        setup=lambda trainer, m, stage: calls.append(("setup", m is module, stage)),
        on_fit_start=lambda trainer, m: calls.append(("on_fit_start", trainer.global_step)),
        on_train_batch_end=lambda trainer, m, outputs, batch, batch_idx: calls.append(
            ("on_train_batch_end", batch_idx, float(outputs["loss"]) > 0, len(batch))
        ),
        on_train_epoch_end=lambda trainer, m: calls.append(("on_train_epoch_end", trainer.current_epoch)),
        on_validation_start=None,  # None: not defined
    )
    others: list[str] = []
    second = LambdaCallback(on_fit_end=lambda trainer, m: others.append("fit_end"))  # two in one Trainer
    quiet_trainer(tmp_path, [callback, second], max_epochs=1).fit(module, regression_loader())
    assert calls == [
        ("setup", True, "fit"),
        ("on_fit_start", 0),
        *[("on_train_batch_end", i, True, 2) for i in range(4)],
        ("on_train_epoch_end", 0),
    ]
    assert others == ["fit_end"]
    assert sorted(callback.hooks) == ["on_fit_start", "on_train_batch_end", "on_train_epoch_end", "setup"]
    assert callback.state_key != second.state_key


def test_on_exception_receives_the_exception(tmp_path: Path) -> None:
    seen: list[BaseException] = []
    callback = LambdaCallback(on_exception=lambda trainer, m, exception: seen.append(exception))
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(tmp_path, [callback], max_epochs=1).fit(Net(fail=True), regression_loader())
    assert [str(e) for e in seen] == ["boom"]


def test_an_unknown_hook_is_refused_naming_the_nearest() -> None:
    with pytest.raises(
        TypeError,
        match=r"'on_train_batch_ends' is not a callback hook; did you mean 'on_train_batch_end'\? valid hooks: on_after_backward, ",
    ):
        LambdaCallback(on_train_batch_ends=lambda *args: None)
    with pytest.raises(
        TypeError, match=r"'state_dict' is not a callback hook; valid hooks: .*setup, teardown$"
    ):
        LambdaCallback(state_dict=lambda: {})
    with pytest.raises(TypeError, match=r"LambdaCallback\(on_fit_start=3\) must be a function"):
        LambdaCallback(on_fit_start=3)  # type: ignore[arg-type]
    hooks = [n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown")]
    LambdaCallback(**dict.fromkeys(hooks, print))  # every hook of Callback is accepted
