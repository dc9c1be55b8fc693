"""SpikeDetection: a loss spike stops the fit and names the batches to skip; no false alarm on a
smooth loss; non-finite losses; the max mode; its state in checkpoints; two real DDP processes,
where a spike on one stops both."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import TrainModule
from ember.callbacks import ModelCheckpoint, SpikeDetection, TrainingSpikeException


class Net(TrainModule):
    """Its loss is about 1 (a little jitter, no trend), ``scale`` times that at the training batches
    of ``at`` (global batch indices; on process ``rank`` only, when given)."""

    def __init__(self, at: tuple[int, ...] = (), scale: float = 100.0, rank: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.at, self.scale, self.rank = at, scale, rank
        self.batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        value = 1.0 + 0.05 * (self.batches % 3)
        if self.batches in self.at and (self.rank is None or self.trainer.global_rank == self.rank):
            value *= self.scale
        self.batches += 1
        return self.net(batch[0]).sum() * 0.0 + value

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> Any:
    return regression_loader(batch_size=2)  # 8 batches an epoch


def test_a_spike_stops_the_fit_and_names_the_batches_to_skip(tmp_path: Path) -> None:
    spikes = SpikeDetection(window=3)
    trainer = quiet_trainer(tmp_path, [spikes], max_epochs=2)
    with pytest.raises(TrainingSpikeException, match="Training spike detected in batch 5") as caught:
        trainer.fit(Net(at=(8 + 5,)), _loader())  # batch 5 of the second epoch
    assert caught.value.batch_idx == 5
    assert json.loads((tmp_path / "skip_batches.json").read_text()) == [4, 5]
    assert spikes.bad_batches == [4, 5]
    assert trainer.global_step == 8 + 6  # the spiking batch's step was taken


def test_a_smooth_loss_trains_to_the_end_and_small_jumps_pass(tmp_path: Path) -> None:
    spikes = SpikeDetection(window=3, exclude_batches_path=tmp_path / "elsewhere")
    trainer = quiet_trainer(tmp_path, [spikes], max_epochs=2)
    trainer.fit(Net(at=(3, 11), scale=1.5), _loader())  # worse than the last, within 2x of the mean
    assert trainer.global_step == 16 and spikes.bad_batches == []
    assert len(spikes.state_dict()["values"]) == 3
    assert not (tmp_path / "elsewhere").exists()


def test_the_first_batches_of_an_epoch_are_warmup(tmp_path: Path) -> None:
    trainer = quiet_trainer(tmp_path, [SpikeDetection(window=3, warmup=2)], max_epochs=2)
    trainer.fit(Net(at=(9,)), _loader())  # batch 1 of the second epoch: warm-up
    assert trainer.global_step == 16


@pytest.mark.parametrize("finite_only", [True, False])
def test_an_infinite_loss_worse_than_the_last_is_a_spike(tmp_path: Path, finite_only: bool) -> None:
    # finite_only: any non-finite loss is a spike. Without it the loss takes the usual test, as in
    # Lightning: +inf (mode="min") is worse than the last loss and infinitely far from the mean.
    spikes = SpikeDetection(finite_only=finite_only, exclude_batches_path=tmp_path / "skip.json")
    trainer = quiet_trainer(tmp_path, [spikes], max_epochs=1, non_finite=None)  # (no NonFiniteGuard)
    with pytest.raises(TrainingSpikeException, match="batch 3"):
        trainer.fit(Net(at=(3,), scale=math.inf), _loader())
    assert json.loads((tmp_path / "skip.json").read_text()) == [2, 3]


@pytest.mark.parametrize("scale", [math.nan, -math.inf])
def test_without_finite_only_a_nan_or_a_better_infinite_loss_is_ignored(tmp_path: Path, scale: float) -> None:
    spikes = SpikeDetection(finite_only=False, exclude_batches_path=tmp_path / "skip.json")
    trainer = quiet_trainer(tmp_path, [spikes], max_epochs=1, non_finite=None)
    trainer.fit(Net(at=(3,), scale=scale), _loader())  # neither a spike nor kept
    assert trainer.global_step == 8
    values = spikes.state_dict()["values"]
    assert len(values) == 7 and all(map(math.isfinite, values))


class _Stub:
    world_size, is_global_zero, default_root_dir = 1, True, "."


@pytest.mark.parametrize(
    ("mode", "losses", "spike_at"),
    [("max", [5.0, 5.2, 5.1, 1.0], 3), ("max", [5.0, 5.2, 9.0, 1.0], 3), ("min", [5.0, 4.0, 30.0], 2),
     ("min", [5.0, 4.0, 6.0], None)],
)  # fmt: skip
def test_worse_means_lower_in_max_mode(
    tmp_path: Path, mode: str, losses: list[float], spike_at: int | None
) -> None:
    spikes = SpikeDetection(mode=mode, rtol=0.5, exclude_batches_path=tmp_path)
    seen = None
    for i, value in enumerate(losses):
        try:
            spikes.on_train_batch_end(_Stub(), None, torch.tensor(value), None, i)  # type: ignore[arg-type]
        except TrainingSpikeException as error:
            seen = error.batch_idx
            break
    assert seen == spike_at


def test_the_window_survives_a_resume(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(save_last=True)
    first = SpikeDetection(window=4)
    quiet_trainer(tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        Net(), _loader()
    )
    resumed = SpikeDetection(window=4)
    trainer = quiet_trainer(tmp_path, [resumed], max_epochs=2)
    with pytest.raises(TrainingSpikeException, match="batch 0"):  # warmup=0: the restored window judges it
        resumed.warmup = 0
        trainer.fit(Net(at=(0,)), _loader(), ckpt_path=checkpoint.last_model_path)
    assert resumed.state_dict()["values"] == first.state_dict()["values"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"mode": "up"}, r"mode='up'\): valid choices are 'min', 'max'"), ({"window": 0}, r"window=0\) must be an int >= 1"),
     ({"rtol": -1.0}, r"rtol=-1.0\) must be"), ({"exclude_batches_path": 3}, r"exclude_batches_path=3\) must be a path")],
)  # fmt: skip
def test_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        SpikeDetection(**arguments)


def _ddp_worker(root: str) -> str:
    trainer = quiet_trainer(Path(root), [SpikeDetection(window=3)], strategy="ddp", max_epochs=2)
    try:
        trainer.fit(Net(at=(6,), rank=1), regression_loader(batch_size=1))  # 8 batches a process and epoch
    except TrainingSpikeException as error:
        return f"{error} at step {trainer.global_step}"
    return "no spike"


def test_a_spike_on_one_process_stops_every_process(tmp_path: Path) -> None:
    assert run_processes(_ddp_worker, str(tmp_path)) == ["Training spike detected in batch 6 at step 7"] * 2
    assert json.loads((tmp_path / "skip_batches.json").read_text()) == [5, 6]
