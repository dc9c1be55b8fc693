"""WeightAveraging and EMAWeightAveraging: the Trainer's average equals torch's AveragedModel in a
hand-written loop (weights and BatchNorm buffers), validation and checkpoints see the average, a
resumed fit ends bit for bit as an unbroken one, the update schedule, bad arguments, sharded
strategies refused, and two real DDP processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_data, regression_loader
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ember import TrainModule
from ember.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.seen: list[list[torch.Tensor]] = []  # the weights each validation run saw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen.append([t.detach().clone() for t in _tensors(self)])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _hand_written(epochs: int, decay: float) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """torch's recipe: an AveragedModel updated after every optimizer step. The final average and
    the average at the end of each epoch."""
    torch.manual_seed(0)
    module = Net()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    average = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    at_epoch_end = []
    for _ in range(epochs):
        module.train()
        for x, y in regression_loader():
            F.mse_loss(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            average.update_parameters(module)
        at_epoch_end.append([t.detach().clone() for t in _tensors(average.module)])
    return at_epoch_end[-1], at_epoch_end


def _assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_ema_equals_a_hand_written_loop_in_validation_checkpoints_and_at_the_end(tmp_path: Path) -> None:
    final, at_epoch_end = _hand_written(epochs=3, decay=0.8)
    torch.manual_seed(0)
    module = Net()
    ema = EMAWeightAveraging(decay=0.8)
    trainer = quiet_trainer(tmp_path, [ema, ModelCheckpoint(save_top_k=-1)], max_epochs=3,
                            num_sanity_val_steps=0, enable_checkpointing=True)  # fmt: skip
    trainer.fit(module, regression_loader(), regression_loader())
    assert ema.n_averaged == 3 * 4
    _assert_same([t.detach() for t in _tensors(module)], final)  # the average, copied in at the end
    # Each epoch-end validation ran on that epoch's average, and training went on with its own weights
    # (else the final average would differ).
    assert len(module.seen) == 3
    for seen, expected in zip(module.seen, at_epoch_end, strict=True):
        _assert_same(seen, expected)
    # Each checkpoint stores the average as the model's weights.
    loaded = Net.load_from_checkpoint(tmp_path / "checkpoints" / "epoch=1-step=8")
    _assert_same([t.detach() for t in _tensors(loaded)], at_epoch_end[1])


def test_a_resumed_fit_ends_bit_for_bit_as_an_unbroken_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unbroken = Net()
    quiet_trainer(tmp_path / "a", [EMAWeightAveraging(decay=0.7, update_every_n_steps=3)], max_epochs=4).fit(
        unbroken, regression_loader()
    )
    torch.manual_seed(0)
    first = Net()
    checkpoint = ModelCheckpoint(save_last=True)
    quiet_trainer(tmp_path / "b", [EMAWeightAveraging(decay=0.7, update_every_n_steps=3), checkpoint],
                  max_epochs=2, enable_checkpointing=True).fit(first, regression_loader())  # fmt: skip
    resumed, ema = Net(), EMAWeightAveraging(decay=0.7, update_every_n_steps=3)
    trainer = quiet_trainer(tmp_path / "b", [ema], max_epochs=4)
    trainer.fit(resumed, regression_loader(), ckpt_path=checkpoint.last_model_path)
    assert ema.n_averaged == 6  # steps 0, 3, ..., 15
    _assert_same([t.detach() for t in _tensors(resumed)], [t.detach() for t in _tensors(unbroken)])


class EveryOtherEpoch(WeightAveraging):
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx % 2 == 1


def test_the_equal_weight_average_of_the_epochs_should_update_picks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Net()
    ends: list[list[torch.Tensor]] = []

    class Record(WeightAveraging):  # (a callback listed first sees the epoch-end weights)
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            ends.append([p.detach().clone() for p in module.parameters()])

    averaging = EveryOtherEpoch(use_buffers=False)
    quiet_trainer(tmp_path, [Record(), averaging], max_epochs=4).fit(module, regression_loader())
    assert averaging.n_averaged == 2
    for ours, first, second in zip(module.parameters(), ends[1], ends[3], strict=True):
        torch.testing.assert_close(ours.detach(), (first + second) / 2)


def test_ema_update_schedule() -> None:
    ema = EMAWeightAveraging(update_every_n_steps=5, update_starting_at_step=10, update_starting_at_epoch=2)
    assert [s for s in range(30) if ema.should_update(step_idx=s)] == [10, 15, 20, 25]
    assert [e for e in range(5) if ema.should_update(epoch_idx=e)] == [2, 3, 4]
    never = EMAWeightAveraging(update_every_n_steps=0)
    assert not any(never.should_update(step_idx=s) for s in range(10))
    assert not never.should_update(epoch_idx=3)
    assert WeightAveraging().should_update(step_idx=0) and not WeightAveraging().should_update(epoch_idx=0)


def test_nothing_averaged_leaves_the_weights_and_checkpoints_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = Net()
    quiet_trainer(tmp_path / "a", [], max_epochs=2).fit(plain, regression_loader())
    torch.manual_seed(0)
    module = Net()
    ema = EMAWeightAveraging(update_starting_at_step=1000)
    trainer = quiet_trainer(tmp_path / "b", [ema], max_epochs=2)
    trainer.fit(module, regression_loader())
    assert ema.n_averaged == 0
    _assert_same([t.detach() for t in _tensors(module)], [t.detach() for t in _tensors(plain)])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: EMAWeightAveraging(decay=1.5),
            r"EMAWeightAveraging\(decay=1.5\) must be a number in \[0, 1\]",
        ),
        (
            lambda: EMAWeightAveraging(update_every_n_steps=-1),
            r"update_every_n_steps=-1\) must be an int >= 0",
        ),
        (
            lambda: EMAWeightAveraging(avg_fn=lambda a, b, n: a),
            r"avg_fn=...\) is not valid: the average is the EMA",
        ),
        (lambda: WeightAveraging(device="gpu-ish"), r"WeightAveraging\(device='gpu-ish'\) is not valid"),
        (
            lambda: WeightAveraging(decay=0.9),
            r"unexpected keyword argument 'decay': valid choices are 'device'",
        ),
        (lambda: WeightAveraging(avg_fn=3), r"WeightAveraging\(avg_fn=3\) must be a function or None"),
        (lambda: WeightAveraging(use_buffers="yes"), r"use_buffers='yes'\) must be True or False"),
    ],
)
def test_bad_arguments_are_refused_at_construction(make: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        make()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_before_training(tmp_path: Path, strategy: str) -> None:
    trainer = quiet_trainer(tmp_path, [EMAWeightAveraging()], strategy=strategy, max_epochs=1)
    with pytest.raises(
        ValueError, match=rf"EMAWeightAveraging keeps a full copy .* the '{strategy}' strategy"
    ):
        trainer.fit(Net(), regression_loader())
    assert trainer.global_step == 0


def _ddp_worker(root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    module = Net()
    ema = EMAWeightAveraging(decay=0.8)
    quiet_trainer(Path(root), [ema], strategy="ddp", max_epochs=2).fit(
        module, regression_loader(batch_size=4)
    )
    return {"weights": [p.detach().flatten().tolist() for p in module.parameters()], "n": ema.n_averaged}


def test_ddp_averages_identically_on_every_process(tmp_path: Path) -> None:
    ranks = run_processes(_ddp_worker, str(tmp_path))
    assert ranks[0] == ranks[1]  # bit for bit
    assert ranks[0]["n"] == 2 * len(regression_data()) // 8  # 2 epochs of 2 steps of 2 x 4 samples
