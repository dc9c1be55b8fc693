"""ModelPruning: the Trainer's result equals a hand-written loop on torch.nn.utils.prune (masks and
weights, the lottery ticket reset included); checkpoints of a pruned fit hold weight_orig and
weight_mask and resume bit for bit, and load into a plain module; the final model's weights are
plain; bad arguments; sharded strategies refused; two real DDP processes prune alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from dist_helpers import run_processes
from small_fit import quiet_trainer, regression_loader
from torch import nn

from ember import TrainModule
from ember.callbacks import ModelCheckpoint, ModelPruning
from ember.strategies.checkpoint_io import load_tensors


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _layers(module: Net) -> list[nn.Linear]:
    return [module.net[0], module.net[2]]


def _hand_written(epochs: int, amount: float, lottery: bool) -> Net:
    """torch's recipe, written out: train an epoch, prune every weight and bias globally by L1
    magnitude, reset what is left to its initial values (the lottery ticket), repeat; then make the
    pruning permanent."""
    module = _net()
    pairs = [(layer, name) for name in ("weight", "bias") for layer in _layers(module)]
    initial = [getattr(layer, name).detach().clone() for layer, name in pairs]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in regression_loader():
            F.mse_loss(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # the weights after the last step (the pre-hook ran before it)
            for layer, name in pairs:
                if hasattr(layer, name + "_orig"):
                    setattr(layer, name, getattr(layer, name + "_orig") * getattr(layer, name + "_mask"))
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=amount)
        if lottery:
            with torch.no_grad():
                for (layer, name), start in zip(pairs, initial, strict=True):
                    getattr(layer, name + "_orig").copy_(start)
    for layer, name in pairs:
        prune.remove(layer, name)
    return module


@pytest.mark.parametrize("lottery", [True, False])
def test_fit_equals_a_hand_written_loop_and_ends_with_plain_weights(tmp_path: Path, lottery: bool) -> None:
    expected = _hand_written(epochs=2, amount=0.3, lottery=lottery)
    module = _net()
    pruning = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=lottery)
    quiet_trainer(tmp_path, [pruning], max_epochs=2).fit(module, regression_loader())
    assert sorted(module.state_dict()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert all(type(p) is nn.Parameter for p in module.parameters())
    assert not any(layer._forward_pre_hooks for layer in _layers(module))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    zeros = sum(int((p == 0).sum()) for p in module.parameters())
    assert zeros == 12 + 9  # 30% of the 41, then of the 29 left


def test_amount_and_schedule_as_functions_of_the_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _net()
    pruning = ModelPruning(
        "random_unstructured",
        parameter_names=["weight"],
        amount=lambda epoch: 5 if epoch == 1 else 0.5,  # an int: a count of weights
        apply_pruning=lambda epoch: epoch >= 1,
        make_pruning_permanent=False,
        verbose=1,
    )
    quiet_trainer(tmp_path, [pruning], max_epochs=2).fit(module, regression_loader())
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("Applied")] == [
        "Applied `RandomUnstructured`. Pruned: 0/32 (0.00%) -> 5/32 (15.62%)"
    ]
    assert not hasattr(module.net[0], "bias_mask")
    masks = [module.net[0].weight_mask, module.net[2].weight_mask]
    assert sum(int((m == 0).sum()) for m in masks) == 5
    # Not made permanent: the forward multiplies by the masks.
    assert torch.equal(module.net[0].weight, module.net[0].weight_orig * module.net[0].weight_mask)


def test_local_structured_pruning_and_a_function(tmp_path: Path) -> None:
    module = _net()
    first = module.net[0]
    pruning = ModelPruning(
        "ln_structured",
        parameters_to_prune=[(first, "weight")],
        use_global_unstructured=False,
        pruning_dim=0,
        pruning_norm=2,
        amount=0.25,
        use_lottery_ticket_hypothesis=False,
    )
    quiet_trainer(tmp_path, [pruning], max_epochs=1).fit(module, regression_loader())
    assert int((first.weight.abs().sum(1) == 0).sum()) == 2  # 2 of the 8 rows
    assert module.net[2].weight.count_nonzero() == 8  # not listed: untouched
    # A function of torch.nn.utils.prune, one parameter at a time.
    module = _net()
    pruning = ModelPruning(
        prune.l1_unstructured, parameter_names=["weight"], use_global_unstructured=False, amount=2
    )
    quiet_trainer(tmp_path, [pruning], max_epochs=1).fit(module, regression_loader())
    assert [int((layer.weight == 0).sum()) for layer in _layers(module)] == [2, 2]


def test_a_pruned_fits_checkpoints_resume_bit_for_bit_and_load_plain(tmp_path: Path) -> None:
    def fit(epochs: int, directory: Path, resume: Path | None = None, module: Net | None = None) -> Net:
        module = module or _net()
        pruning = ModelPruning("l1_unstructured", amount=0.3)  # the lottery ticket's start is state too
        checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
        trainer = quiet_trainer(tmp_path, [pruning, checkpoint], max_epochs=epochs, enable_checkpointing=True)
        trainer.fit(module, regression_loader(), regression_loader(), ckpt_path=resume)
        return module

    whole = fit(3, tmp_path / "whole")
    fit(1, tmp_path / "first")
    saved = load_tensors(tmp_path / "first" / "last" / "model.safetensors")
    assert sorted(saved) == sorted(
        f"net.{i}.{n}_{s}" for i in (0, 2) for n in ("bias", "weight") for s in ("mask", "orig")
    )
    state = json.loads((tmp_path / "first" / "last" / "trainer_state.json").read_text())
    assert state["callbacks"]["ModelPruning"]["pruned"] == [
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    ]
    # A plain module loads it: each weight is weight_orig * weight_mask, as prune.remove leaves it.
    plain = Net.load_from_checkpoint(tmp_path / "first" / "last")
    assert torch.equal(plain.net[0].weight, saved["net.0.weight_orig"] * saved["net.0.weight_mask"])
    trainer = quiet_trainer(tmp_path, [], max_epochs=1)
    module = Net()
    trainer.validate(module, regression_loader(), ckpt_path=tmp_path / "first" / "last", verbose=False)
    assert torch.equal(module.net[2].bias, saved["net.2.bias_orig"] * saved["net.2.bias_mask"])
    resumed = fit(3, tmp_path / "second", resume=tmp_path / "first" / "last")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def _invalid(**arguments: Any) -> dict[str, Any]:
    return {"pruning_fn": "l1_unstructured", **arguments}


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (_invalid(pruning_fn="l2_unstructured"), ValueError, r"not one of torch's pruning functions. Valid choices: 'ln_structured'"),
        (_invalid(pruning_fn="random_structured", use_global_unstructured=False), ValueError, "give pruning_dim"),
        (_invalid(pruning_fn="ln_structured", pruning_dim=0, use_global_unstructured=False), ValueError, "needs pruning_norm"),
        (_invalid(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=1), ValueError, "prunes structured: use_global_unstructured=True"),
        (_invalid(pruning_fn=prune.L1Unstructured(0.5)), TypeError, "instance: pass its class"),
        (_invalid(pruning_fn=prune.l1_unstructured), ValueError, "a function prunes one parameter at a time"),
        (_invalid(pruning_fn=3), TypeError, "must be one of"),
        (_invalid(amount=1.5), ValueError, r"amount=1.5\) must be a float in \[0, 1\]"),
        (_invalid(amount=-1), ValueError, r"amount=-1\) must be"),
        (_invalid(amount=True), TypeError, r"amount=True\) must be"),
        (_invalid(verbose=3), ValueError, r"verbose=3\) is not valid. Valid choices: 0, 1, 2"),
        (_invalid(apply_pruning="yes"), TypeError, "apply_pruning='yes'"),
        (_invalid(parameter_names="weight"), TypeError, "parameter_names='weight'"),
        (_invalid(parameters_to_prune=[nn.Linear(1, 1)]), TypeError, r"\(nn.Module, 'parameter name'\) pairs"),
        (_invalid(make_pruning_permanent=1), TypeError, "make_pruning_permanent=1"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_at_construction(
    arguments: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        ModelPruning(**arguments)


def test_what_the_module_lacks_is_refused_when_the_fit_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not in the module: Linear.weight"):
        quiet_trainer(tmp_path, [ModelPruning("l1_unstructured", [(nn.Linear(1, 1), "weight")])]).fit(
            _net(), regression_loader()
        )
    with pytest.raises(ValueError, match="no layer of Net has a parameter named weights"):
        quiet_trainer(tmp_path, [ModelPruning("l1_unstructured", parameter_names=["weights"])]).fit(
            _net(), regression_loader()
        )


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_at_fit_start(tmp_path: Path, strategy: str) -> None:
    trainer = quiet_trainer(tmp_path, [ModelPruning("l1_unstructured")], strategy=strategy, max_epochs=1)
    with pytest.raises(
        ValueError, match=rf"the '{strategy}' strategy does not hold .* use DDP or a single device"
    ):
        trainer.fit(_net(), regression_loader())
    assert trainer.global_step == 0


def _ddp_worker(root: str, pruning_fn: str) -> dict[str, Any]:
    module = _net()  # DDP starts every process from rank 0's weights
    torch.manual_seed(int(os.environ["RANK"]))  # each process draws its own random masks and values
    pruning = ModelPruning(pruning_fn, amount=0.4, make_pruning_permanent=False, resample_parameters=True)
    trainer = quiet_trainer(Path(root), [pruning], strategy="ddp", max_epochs=3)
    trainer.fit(module, regression_loader(batch_size=2))
    return {name: tensor.tolist() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("pruning_fn", ["random_unstructured"])
def test_two_ddp_processes_prune_alike_and_keep_training_in_sync(tmp_path: Path, pruning_fn: str) -> None:
    # Random masks and resampled values differ per process unless rank 0's are broadcast; each
    # process sees other batches, so equal weights after further epochs also show that DDP kept
    # all-reducing the gradients of the re-parametrised weight_orig.
    first, second = run_processes(_ddp_worker, str(tmp_path), pruning_fn)
    assert first == second
    assert sorted(first) == sorted(
        f"net.{i}.{n}_{s}" for i in (0, 2) for n in ("bias", "weight") for s in ("mask", "orig")
    )
    zeros = sum(
        sum(v == 0 for v in torch.tensor(first[k]).flatten().tolist()) for k in first if k.endswith("mask")
    )
    assert zeros == 16 + 10 + 6  # three prunings of 40% of what is left: of 41, 25, 15
