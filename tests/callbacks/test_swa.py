"""StochasticWeightAveraging: the Trainer's result equals a hand-written loop on torch's swa_utils
(weights, learning rates, BatchNorm statistics), the averaging arithmetic, a resume in the middle of
SWA (bit for bit), bad arguments, sharded strategies refused, and two real DDP processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_data, regression_loader
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ember import TrainModule
from ember.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from ember.strategies.checkpoint_io import read_tree


class Net(TrainModule):
    def __init__(self, batch_norm: bool = True, interval: str = "step") -> None:
        super().__init__()
        self.interval = interval
        norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(3, 8), norm, nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class LearningRates(Callback):
    """The learning rate of each training batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class EpochEndWeights(Callback):
    """The weights at the end of each training epoch (listed before the SWA callback: what it averages)."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.weights.append([p.detach().clone() for p in module.parameters()])


def _hand_written(
    module: Net, epochs: int, swa_start: int, swa_lr: float, anneal: int, strategy: str
) -> list[float]:
    """torch's swa_utils recipe: the module's schedule, then SWALR and an average of the epoch ends
    from ``swa_start`` on, the average copied into the module and update_bn. Returns the LR per batch."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    average: AveragedModel | None = None
    swa_scheduler: SWALR | None = None
    lrs = []
    for epoch in range(epochs):
        if epoch == swa_start:
            average = AveragedModel(module)
            swa_scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal, anneal_strategy=strategy)  # type: ignore[arg-type]
        for x, y in regression_loader():
            lrs.append(optimizer.param_groups[0]["lr"])
            F.mse_loss(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if swa_scheduler is None and module.interval == "step":
                scheduler.step()
        if swa_scheduler is None:
            if module.interval == "epoch":
                scheduler.step()
        else:
            assert average is not None
            average.update_parameters(module)
            swa_scheduler.step()
    assert average is not None
    with torch.no_grad():
        for averaged, parameter in zip(average.module.parameters(), module.parameters(), strict=True):
            parameter.copy_(averaged)
    update_bn(regression_loader(), module)
    return lrs


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize(
    ("swa_epoch_start", "strategy", "interval"),
    [(3, "linear", "step"), (0.5, "cos", "epoch")],  # int: the 3rd epoch; 0.5 of 6 epochs: the 3rd too
)
def test_matches_a_hand_written_swa_loop(
    tmp_path: Path, swa_epoch_start: float, strategy: str, interval: str
) -> None:
    torch.manual_seed(0)
    module, reference = Net(interval=interval), Net(interval=interval)
    reference.load_state_dict(module.state_dict())
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=swa_epoch_start, annealing_epochs=2,
                                    annealing_strategy=strategy)  # fmt: skip
    lrs = LearningRates()
    quiet_trainer(tmp_path, [lrs, swa], max_epochs=6).fit(module, regression_loader())
    expected_lrs = _hand_written(reference, 6, 2, 0.02, 2, strategy)

    assert swa.swa_start == 2 and swa.n_averaged == 4  # the ends of epochs 2, 3, 4 and 5
    assert lrs.lrs == expected_lrs
    assert lrs.lrs[8:12] == [lrs.lrs[8]] * 4 != lrs.lrs[12:16]  # SWALR from epoch 2, annealing after it
    assert lrs.lrs[-8:] == [0.02] * 8  # annealed in 2 epochs: the SWA learning rate from epoch 4 on
    _assert_same(_state(module), _state(reference))  # weights and BatchNorm statistics, bit for bit
    # The BatchNorm statistics were recomputed for the averaged weights: the mean of its inputs.
    with torch.no_grad():
        features = module.net[0](regression_data().tensors[0])
    torch.testing.assert_close(module.net[1].running_mean, features.mean(0))


@pytest.mark.parametrize("avg_fn", [None, lambda averaged, current, n: 0.25 * averaged + 0.75 * current])
def test_averages_the_epoch_end_weights_from_swa_start_on(tmp_path: Path, avg_fn: Any) -> None:
    torch.manual_seed(0)
    module = Net(batch_norm=False)
    ends = EpochEndWeights()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, avg_fn=avg_fn, device=None)
    quiet_trainer(tmp_path, [ends, swa], max_epochs=5).fit(module, regression_loader())
    averaged = ends.weights[1:]  # swa_epoch_start=2: the second epoch (1, counted from 0) and after
    assert swa.n_averaged == len(averaged) == 4
    expected = [torch.stack(tensors).mean(0) for tensors in zip(*averaged, strict=True)]
    if avg_fn is not None:
        expected = list(averaged[0])
        for weights in averaged[1:]:
            expected = [avg_fn(e, w, None) for e, w in zip(expected, weights, strict=True)]
    for ours, theirs, last in zip(module.parameters(), expected, ends.weights[-1], strict=True):
        torch.testing.assert_close(ours.detach(), theirs)
        assert not torch.equal(ours.detach(), last)  # not simply the last epoch's weights


def _fit(root: Path, ckpt_path: str | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = Net()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=3, annealing_epochs=3)
    trainer = quiet_trainer(root, [swa, checkpoint], max_epochs=6, enable_checkpointing=True)
    trainer.fit(module, regression_loader(), ckpt_path=ckpt_path)
    assert swa.n_averaged == 4
    return _state(module)


def test_a_fit_resumed_during_swa_ends_with_the_same_weights(tmp_path: Path) -> None:
    full = _fit(tmp_path / "full")
    # 4 steps an epoch, SWA from epoch 2: step 5 is before it, 10 in its first epoch (nothing averaged
    # yet), 15 in the next (one average), 20 the last batch of epoch 4, before the epoch's end.
    directory = tmp_path / "full" / "ckpt"
    state = read_tree(directory / "epoch=3-step=15", "trainer_state")["callbacks"][
        "StochasticWeightAveraging"
    ]
    assert state["started"] and state["n_averaged"] == 1 and state["latest_update_epoch"] == 2
    assert list(state["averaged"]) == [name for name, _ in Net().named_parameters()]
    for name in ("epoch=1-step=5", "epoch=2-step=10", "epoch=3-step=15", "epoch=4-step=20"):
        _assert_same(_fit(tmp_path / name, str(directory / name)), full)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"swa_lrs": -0.1}, r"swa_lrs=-0.1\) is not valid: give a learning rate > 0"),
        ({"swa_lrs": [0.1, 0.0]}, r"swa_lrs=\[0.1, 0.0\]\) is not valid"),
        ({"swa_lrs": []}, r"swa_lrs=\[\]\) is not valid"),
        ({"swa_lrs": "0.1"}, r"swa_lrs='0.1'\) is not valid"),
        ({"swa_lrs": True}, r"swa_lrs=True\) is not valid"),
        ({"swa_lrs": float("nan")}, r"swa_lrs=nan\) is not valid"),
        (
            {"swa_epoch_start": 0},
            r"swa_epoch_start=0\) is not valid: give an int epoch >= 1 .* float fraction",
        ),
        ({"swa_epoch_start": 1.5}, r"swa_epoch_start=1.5\) is not valid"),
        ({"swa_epoch_start": -0.1}, r"swa_epoch_start=-0.1\) is not valid"),
        ({"swa_epoch_start": True}, r"swa_epoch_start=True\) is not valid"),
        ({"annealing_epochs": -1}, r"annealing_epochs=-1\) is not valid: give an int >= 0"),
        ({"annealing_epochs": 2.0}, r"annealing_epochs=2.0\) is not valid"),
        (
            {"annealing_strategy": "exp"},
            r"annealing_strategy='exp'\) is not valid: valid choices are 'cos', 'linear'",
        ),
        ({"avg_fn": 3}, r"avg_fn=3\) is not valid: give a function"),
        ({"device": "gpu"}, r"device='gpu'\) is not valid: give a torch.device"),
        ({"device": 0}, r"device=0\) is not valid"),
    ],
)
def test_bad_arguments_are_refused_at_construction(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"^StochasticWeightAveraging\(" + message):
        StochasticWeightAveraging(**{"swa_lrs": 0.1, **arguments})


class TwoSchedulers(Net):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [
            torch.optim.lr_scheduler.StepLR(optimizer, 1),
            torch.optim.lr_scheduler.StepLR(optimizer, 2),
        ]


@pytest.mark.parametrize(
    ("swa_arguments", "module_class", "trainer_arguments", "message"),
    [
        ({"swa_epoch_start": 0.5}, Net, {"max_steps": 8},
         r"swa_epoch_start=0.5\) is a fraction of max_epochs, and this Trainer has none \(max_epochs=-1\)"),
        ({"swa_lrs": [0.1, 0.2]}, Net, {"max_epochs": 2},
         r"swa_lrs=\[0.1, 0.2\]\) gives 2 learning rates for the optimizer's 1 parameter groups"),
        ({}, TwoSchedulers, {"max_epochs": 2}, r"returned 2: return at most one"),
    ],
)  # fmt: skip
def test_arguments_that_depend_on_the_trainer_are_refused_before_training(
    tmp_path: Path, swa_arguments: dict[str, Any], module_class: type[Net], trainer_arguments: dict[str, Any],
    message: str,
) -> None:  # fmt: skip
    module = module_class()
    before = _state(module)
    swa = StochasticWeightAveraging(**{"swa_lrs": 0.1, **swa_arguments})
    trainer = quiet_trainer(tmp_path, [swa], **trainer_arguments)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, regression_loader())
    assert trainer.global_step == 0
    _assert_same(_state(module), before)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_at_fit_start(tmp_path: Path, strategy: str) -> None:
    trainer = quiet_trainer(tmp_path, [StochasticWeightAveraging(0.1)], strategy=strategy, max_epochs=1)
    assert not trainer.strategy.supports_weight_averaging
    with pytest.raises(
        ValueError, match=rf"the '{strategy}' strategy does not hold .* use DDP or a single device"
    ):
        trainer.fit(Net(batch_norm=False), regression_loader())
    assert trainer.global_step == 0


def _ddp_worker(root: str) -> dict[str, Any]:
    """Two fits on 2 processes: without BatchNorm (the weights), with it (the recomputed statistics)."""
    torch.manual_seed(0)
    module = Net(batch_norm=False)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)
    quiet_trainer(Path(root), [swa], strategy="ddp", max_epochs=4).fit(
        module, regression_loader(batch_size=4)
    )
    weights = [p.detach().flatten().tolist() for p in module.parameters()]
    torch.manual_seed(0)
    normed = Net()
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)
    quiet_trainer(Path(root), [swa], strategy="ddp", max_epochs=4).fit(
        normed, regression_loader(batch_size=4)
    )
    with torch.no_grad():
        features = normed.net[0](regression_data().tensors[0])  # every sample, both processes' shards
    return {"weights": weights, "n_averaged": swa.n_averaged, "running_mean": normed.net[1].running_mean.tolist(),
            "running_var": normed.net[1].running_var.tolist(), "feature_mean": features.mean(0).tolist()}  # fmt: skip


def test_ddp_averages_identically_on_every_process_and_as_one_process(tmp_path: Path) -> None:
    ranks = run_processes(_ddp_worker, str(tmp_path))
    assert ranks[0] == ranks[1]  # every value, bit for bit
    assert ranks[0]["n_averaged"] == 3
    # One process with the global batch (2 x 4 samples) takes the same steps.
    torch.manual_seed(0)
    module = Net(batch_norm=False)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)
    quiet_trainer(tmp_path, [swa], max_epochs=4).fit(module, regression_loader(batch_size=8))
    for ours, theirs in zip(module.parameters(), ranks[0]["weights"], strict=True):
        torch.testing.assert_close(ours.detach().flatten(), torch.tensor(theirs))
    # BatchNorm's mean over each process's shard, averaged across them: the mean over all the data.
    torch.testing.assert_close(torch.tensor(ranks[0]["running_mean"]), torch.tensor(ranks[0]["feature_mean"]))


def test_swa_end_is_the_last_epoch_as_lightnings(tmp_path: Path) -> None:
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.5)
    with pytest.raises(RuntimeError, match="swa_end is known once fit"):
        swa.swa_end  # noqa: B018
    quiet_trainer(tmp_path, [swa], max_epochs=4).fit(Net(batch_norm=False), regression_loader())
    assert (swa.swa_start, swa.swa_end) == (1, 3)
