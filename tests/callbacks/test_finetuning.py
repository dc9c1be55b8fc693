"""BaseFinetuning / BackboneFinetuning: the freeze helpers, Lightning's backbone LR schedule, frozen
weights that stay put until the unfreeze, a bit-identical resume after it, refused strategies, and
two real DDP processes with find_unused_parameters=False whose unfrozen backbone is all-reduced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import CheckpointError, TrainModule
from ember.callbacks import BackboneFinetuning, BaseFinetuning, Callback


class Net(TrainModule):
    def __init__(self, optimizer: str = "sgd", scheduler: bool = False) -> None:
        super().__init__()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.backbone = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # the backbone is frozen by now
        optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=0.05) if self.optimizer == "adam" else torch.optim.SGD(params, lr=0.1)
        )
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Record(Callback):
    """Per epoch: every group's learning rate at the first batch, and the backbone's weights at the end."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.backbone: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.backbone.append([p.detach().clone() for p in module.backbone.parameters()])


# -- the static helpers -------------------------------------------------------------------------------
def _bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 1)))


def test_flatten_modules_and_filter_params() -> None:
    net = _bn_net()
    assert BaseFinetuning.flatten_modules(net) == [net[0], net[1], net[2][0]]
    assert BaseFinetuning.flatten_modules(nn.ModuleDict({"a": net[0], "b": net[2]})) == [net[0], net[2][0]]
    assert BaseFinetuning.flatten_modules([net[0], [net[1]]]) == [net[0], net[1]]
    every = list(BaseFinetuning.filter_params(net))
    assert [id(p) for p in every] == [id(p) for p in net.parameters()]
    without_bn = list(BaseFinetuning.filter_params(net, train_bn=False))
    assert {id(p) for p in without_bn} == {id(p) for p in [*net[0].parameters(), *net[2].parameters()]}
    assert list(BaseFinetuning.filter_params(net, requires_grad=False)) == []


def test_freeze_keeps_batch_norm_trainable_with_train_bn() -> None:
    net = _bn_net()
    BaseFinetuning.freeze(net, train_bn=True)
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True, False, False]
    assert net[1].track_running_stats
    BaseFinetuning.freeze(net, train_bn=False)
    assert not any(p.requires_grad for p in net.parameters())
    assert not net[1].track_running_stats
    frozen = list(BaseFinetuning.filter_params(net, requires_grad=False))
    assert len(frozen) == 6
    BaseFinetuning.make_trainable(net)
    assert all(p.requires_grad for p in net.parameters()) and net[1].track_running_stats


def test_filter_on_optimizer_skips_held_parameters_by_identity() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.zero_()  # equal values: still different parameters
    optimizer = torch.optim.SGD(a.parameters(), lr=0.1)
    kept = BaseFinetuning.filter_on_optimizer(optimizer, [*a.parameters(), *b.parameters()])
    assert [id(p) for p in kept] == [id(p) for p in b.parameters()]


def test_unfreeze_and_add_param_group() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    BaseFinetuning.freeze(b)
    optimizer = torch.optim.SGD(a.parameters(), lr=0.1)
    BaseFinetuning.unfreeze_and_add_param_group(b, optimizer)  # the first group's lr / initial_denom_lr
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == pytest.approx(0.01)
    assert all(p.requires_grad for p in b.parameters())
    BaseFinetuning.unfreeze_and_add_param_group(b, optimizer, lr=0.5)  # already held: no group
    assert len(optimizer.param_groups) == 2
    c = nn.Linear(2, 2)
    BaseFinetuning.unfreeze_and_add_param_group(c, optimizer, lr=0.5, initial_denom_lr=100.0)
    assert optimizer.param_groups[2]["lr"] == 0.5  # an explicit lr is not divided


# -- BackboneFinetuning in a fit -------------------------------------------------------------------------
def _expected_backbone_lrs(
    epochs: int, at: int, lr: float, initial: float, align: bool
) -> list[float | None]:
    """Lightning's formula: ``initial`` at the unfreeze epoch, then ``lambda(epoch + 1) * previous``
    (2x with the default ``multiplicative``, as Lightning's), capped at the first group's lr when aligned."""
    lrs: list[float | None] = []
    previous = None
    for epoch in range(epochs):
        if epoch < at:
            lrs.append(None)
            continue
        previous = initial if epoch == at else 2.0 * previous  # type: ignore[operator]
        if align and previous > lr:
            previous = lr
        lrs.append(previous)
    return lrs


@pytest.mark.parametrize(
    ("kwargs", "initial", "align"),
    [({}, 0.1 * 0.1, True), ({"backbone_initial_lr": 0.05, "should_align": False}, 0.05, False)],
)
def test_backbone_lr_schedule_and_frozen_weights(
    tmp_path: Path, kwargs: dict, initial: float, align: bool
) -> None:
    torch.manual_seed(0)
    module, record = Net(), Record()
    start = [p.detach().clone() for p in module.backbone.parameters()]
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2, **kwargs)
    quiet_trainer(tmp_path, [finetuning, record], max_epochs=7).fit(module, regression_loader())
    got = [lrs[1] if len(lrs) > 1 else None for lrs in record.lrs]
    expected = _expected_backbone_lrs(7, 2, 0.1, initial, align)
    assert got == pytest.approx(expected)
    assert all(lrs[0] == 0.1 for lrs in record.lrs)
    for epoch in (0, 1):  # frozen: not one bit moved
        assert all(torch.equal(p, q) for p, q in zip(record.backbone[epoch], start, strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(record.backbone[2], start, strict=True))
    assert all(p.requires_grad for p in module.backbone.parameters())


def test_bad_arguments_and_missing_backbone_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unfreeze_backbone_at_epoch=-1\) must be an int >= 0"):
        BackboneFinetuning(unfreeze_backbone_at_epoch=-1)
    with pytest.raises(ValueError, match=r"initial_denom_lr=0\) must be a finite number > 0"):
        BackboneFinetuning(initial_denom_lr=0)

    class NoBackbone(Net):
        def __init__(self) -> None:
            super().__init__()
            del self.backbone
            self.body = nn.Linear(3, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    trainer = quiet_trainer(tmp_path, [BackboneFinetuning()], max_epochs=1)
    with pytest.raises(ValueError, match=r"needs module.backbone, an nn.Module; NoBackbone.backbone is None"):
        trainer.fit(NoBackbone(), regression_loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_strategies_that_cannot_rewrap_are_refused_at_fit_start(tmp_path: Path, strategy: str) -> None:
    trainer = quiet_trainer(tmp_path, [BackboneFinetuning(1)], strategy=strategy, max_epochs=1)
    assert not trainer.strategy.supports_trainable_refresh
    with pytest.raises(ValueError, match=rf"the '{strategy}' strategy cannot follow that"):
        trainer.fit(Net(), regression_loader())
    assert trainer.global_step == 0


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_resume_after_the_unfreeze_is_bit_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = Net(optimizer="adam", scheduler=True)
    quiet_trainer(tmp_path, [BackboneFinetuning(1)], max_epochs=4).fit(whole, regression_loader())

    torch.manual_seed(0)
    first = Net(optimizer="adam", scheduler=True)
    trainer = quiet_trainer(tmp_path, [BackboneFinetuning(1)], max_epochs=2)
    trainer.fit(first, regression_loader())
    assert len(trainer.optimizers[0].param_groups) == 2
    path = trainer.save_checkpoint(tmp_path / "after-unfreeze")

    torch.manual_seed(1)  # other initial weights: all comes from the checkpoint
    resumed = Net(optimizer="adam", scheduler=True)
    again = quiet_trainer(tmp_path, [BackboneFinetuning(1)], max_epochs=4)
    again.fit(resumed, regression_loader(), ckpt_path=path)
    assert len(again.optimizers[0].param_groups) == 2
    for ours, theirs in zip(_weights(resumed), _weights(whole), strict=True):
        assert torch.equal(ours, theirs)

    # The callbacks' state is read ahead of the checkpoint's verification: a damaged file is refused
    # before any callback sees it (the module keeps its frozen backbone, its single group).
    state = path / "trainer_state.json"
    text = state.read_text()
    state.write_text(text.replace('"epoch": 2', '"epoch": 3', 1))
    assert state.read_text() != text
    torch.manual_seed(1)
    damaged = Net(optimizer="adam", scheduler=True)
    refused = quiet_trainer(tmp_path, [BackboneFinetuning(1)], max_epochs=4)
    with pytest.raises(CheckpointError, match="trainer_state.json' does not match"):
        refused.fit(damaged, regression_loader(), ckpt_path=path)
    assert len(refused.optimizers[0].param_groups) == 1
    assert not any(p.requires_grad for p in damaged.backbone.parameters())


# -- two DDP processes ----------------------------------------------------------------------------------
def _ddp_worker(root: str) -> dict[str, Any]:
    """On 2 processes, DDP's defaults (find_unused_parameters=False): a fit across the unfreeze, then
    the same fit stopped after it and resumed from its checkpoint."""
    torch.manual_seed(0)
    module = Net()
    start = [p.detach().clone() for p in module.backbone.parameters()]
    quiet_trainer(Path(root), [BackboneFinetuning(1)], strategy="ddp", max_epochs=3).fit(
        module, regression_loader(batch_size=4)
    )
    torch.manual_seed(0)
    first = Net()
    trainer = quiet_trainer(Path(root), [BackboneFinetuning(1)], strategy="ddp", max_epochs=2)
    trainer.fit(first, regression_loader(batch_size=4))
    path = trainer.save_checkpoint(Path(root) / "ddp-after-unfreeze")
    torch.manual_seed(1)
    resumed = Net()
    again = quiet_trainer(Path(root), [BackboneFinetuning(1)], strategy="ddp", max_epochs=3)
    again.fit(resumed, regression_loader(batch_size=4), ckpt_path=path)
    return {
        "weights": [p.detach().flatten().tolist() for p in module.parameters()],
        "resumed": [p.detach().flatten().tolist() for p in resumed.parameters()],
        "moved": [not torch.equal(p, q) for p, q in zip(module.backbone.parameters(), start, strict=True)],
    }


def test_ddp_unfrozen_backbone_is_all_reduced(tmp_path: Path) -> None:
    ranks = run_processes(_ddp_worker, str(tmp_path))
    assert ranks[0] == ranks[1]  # every weight, bit for bit, on both processes
    assert all(ranks[0]["moved"])
    assert ranks[0]["resumed"] == ranks[0]["weights"]
    # One process with the global batch (2 x 4 samples) takes the same steps: the backbone's
    # gradients were averaged across the processes after the unfreeze.
    torch.manual_seed(0)
    module = Net()
    quiet_trainer(tmp_path, [BackboneFinetuning(1)], max_epochs=3).fit(
        module, regression_loader(batch_size=8)
    )
    for ours, theirs in zip(module.parameters(), ranks[0]["weights"], strict=True):
        torch.testing.assert_close(ours.detach().flatten(), torch.tensor(theirs))
