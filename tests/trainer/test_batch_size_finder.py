"""The batch-size finder: ``Tuner.scale_batch_size`` and the ``BatchSizeFinder`` callback.

Running out of memory is simulated as Lightning's tests do: a step raises the error a device
would (``torch.OutOfMemoryError`` or the CPU allocator's ``RuntimeError``) once the batch is larger
than the module's ``limit``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import DataModule, Trainer, TrainModule, Tuner
from ember.callbacks import BatchSizeFinder, Callback

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes"


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1)


def _out_of_memory(error: str) -> BaseException:
    return torch.OutOfMemoryError(CUDA_OOM) if error == "cuda" else RuntimeError(CPU_OOM)


class Net(TrainModule):
    """Its loaders read ``batch_size``; every step larger than ``limit`` runs out of memory.
    Dropout, a shuffled loader, momentum and a schedule: state a search could leave changed."""

    def __init__(self, batch_size: int = 2, limit: int = 10**6, n: int = 64, error: str = "cuda") -> None:
        super().__init__()
        self.batch_size, self.limit, self.n, self.error = batch_size, limit, n, error
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.tried: list[int] = []  # the batch size of each step
        self.exception: BaseException | None = None  # raised instead of running out of memory

    def _step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        self.tried.append(len(x))
        if len(x) > self.limit:
            raise self.exception or _out_of_memory(self.error)
        return F.mse_loss(self.net(x), y)

    def _loader(self, shuffle: bool = False) -> DataLoader:
        return DataLoader(_data(self.n), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)]


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    options = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "enable_checkpointing": False, "max_epochs": 2, "num_sanity_val_steps": 0, **kwargs}  # fmt: skip
    return Trainer(default_root_dir=str(root), **options)


def _trials(tried: list[int]) -> list[int]:
    """The sizes tried, one per trial (a trial's steps share one)."""
    return [size for i, size in enumerate(tried) if i == 0 or tried[i - 1] != size]


# -- the search ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_power_mode_finds_the_largest_power_of_two_that_fits(tmp_path: Path, error: str) -> None:
    module = Net(limit=11, error=error)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, steps_per_trial=3) == 8
    assert module.batch_size == 8
    assert module.tried == [2] * 3 + [4] * 3 + [8] * 3 + [16]  # 3 steps a trial; 16 fails at its first
    assert not any(tmp_path.iterdir())  # the saved state is gone


@pytest.mark.parametrize(("limit", "trials"), [(11, [2, 4, 8, 16, 12, 10, 11]), (37, [2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37])])  # fmt: skip
def test_binsearch_finds_the_exact_limit(tmp_path: Path, limit: int, trials: list[int]) -> None:
    module = Net(limit=limit, n=128)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, mode="binsearch", margin=0) == limit
    assert module.batch_size == limit and _trials(module.tried) == trials


def test_binsearch_keeps_a_margin_below_the_limit_as_lightning(tmp_path: Path) -> None:
    module = Net(limit=37, n=128)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, mode="binsearch") == 35  # int(37 * 0.95)
    assert module.batch_size == 35 and _trials(module.tried)[-1] == 37
    module = Net(limit=37, n=128)
    finder = BatchSizeFinder(mode="binsearch", margin=0.5)
    _trainer(tmp_path, callbacks=[finder], max_steps=1).fit(module)
    assert finder.optimal_batch_size == 18 and module.batch_size == 18
    module = Net(limit=11)  # power mode: no margin (Lightning's)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, margin=0.5) == 8


@pytest.mark.parametrize(("mode", "limit", "found", "trials"), [
    ("power", 10**6, 12, [2, 4, 8, 12]), ("power", 10, 8, [2, 4, 8, 12]),
    ("binsearch", 10**6, 12, [2, 4, 8, 12]), ("binsearch", 10, 10, [2, 4, 8, 12, 10, 11]),
])  # fmt: skip
def test_max_val_caps_the_growth(
    tmp_path: Path, mode: str, limit: int, found: int, trials: list[int]
) -> None:
    module = Net(limit=limit, n=128)
    tuner = Tuner(_trainer(tmp_path))
    assert tuner.scale_batch_size(module, mode=mode, max_val=12, margin=0.0, steps_per_trial=1) == found
    assert _trials(module.tried) == trials


def test_power_mode_halves_until_a_size_fits_when_the_first_fails(tmp_path: Path) -> None:
    module = Net(limit=11)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, init_val=64) == 8
    assert _trials(module.tried) == [64, 32, 16, 8]  # 16 failed already: no need to try it again
    module = Net(limit=0)
    with pytest.raises(RuntimeError, match="every batch size tried ran out of memory"):
        Tuner(_trainer(tmp_path)).scale_batch_size(module, init_val=4)
    assert _trials(module.tried) == [4, 2, 1] and module.batch_size == 2  # the original size is back


def test_max_trials_stops_the_growth(tmp_path: Path) -> None:
    module = Net()
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, max_trials=3, steps_per_trial=1) == 8
    assert module.tried == [2, 4, 8]  # the last size that ran, not an untried one


def test_growth_stops_once_a_batch_holds_the_dataset(tmp_path: Path) -> None:
    module = Net(n=20)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, steps_per_trial=1) == 32  # as Lightning
    assert module.tried == [2, 4, 8, 16, 20]  # the trial at 32 had one batch of the 20 samples


# -- what it leaves: the batch size, nothing else --------------------------------------------------
class Snapshot(Callback):
    """At on_fit_start: the weights, optimizer and scheduler states and counters, as they are then."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.taken: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return f"Snapshot[{self.name}]"

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.taken = {
            "weights": [p.detach().clone() for p in module.parameters()],
            "optimizer": repr(trainer.optimizers[0].state_dict()),
            "scheduler": repr(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
            "steps": (trainer.global_step, trainer.current_epoch),
            "rng": torch.get_rng_state(),
            "training": module.training,
        }


def test_the_callback_searches_at_fit_start_and_restores_everything(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, before, after = Net(limit=11), Snapshot("before"), Snapshot("after")
    finder = BatchSizeFinder(steps_per_trial=2)
    trainer = _trainer(tmp_path, callbacks=[before, finder, after])
    trainer.fit(module)
    assert finder.optimal_batch_size == module.batch_size == 8
    assert before.taken["steps"] == after.taken["steps"] == (0, 0)
    for key in ("optimizer", "scheduler", "training"):
        assert before.taken[key] == after.taken[key], key
    assert torch.equal(before.taken["rng"], after.taken["rng"])
    assert all(
        torch.equal(a, b) for a, b in zip(before.taken["weights"], after.taken["weights"], strict=True)
    )
    assert module.tried[:7] == [2, 2, 4, 4, 8, 8, 16]  # 2 steps a trial
    fit_sizes = module.tried[7:]
    assert set(fit_sizes) == {8} and trainer.global_step == 16  # the fit's loaders have the size found
    # The same fit given that size from the start, with no search: the same weights, bit for bit.
    torch.manual_seed(0)
    plain = Net(batch_size=8, limit=11)
    _trainer(tmp_path).fit(plain)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), plain.parameters(), strict=True))
    assert plain.tried == fit_sizes


def test_a_fit_after_the_tuner_equals_a_fit_without_it(tmp_path: Path) -> None:
    def run(search: bool) -> tuple[list[torch.Tensor], Trainer]:
        torch.manual_seed(0)
        module = Net(limit=11, batch_size=2 if search else 8)
        trainer = _trainer(tmp_path)
        if search:
            assert Tuner(trainer).scale_batch_size(module, mode="binsearch", init_val=4, margin=0) == 11
            module.batch_size = 8  # (a size both runs train with)
        trainer.fit(module)
        return [p.detach().clone() for p in module.parameters()], trainer

    (searched, trainer), (plain, plain_trainer) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(searched, plain, strict=True))
    assert trainer.global_step == plain_trainer.global_step == 16


class InHparams(Net):
    def __init__(self, batch_size: int = 2, limit: int = 11) -> None:
        super().__init__(limit=limit)
        del self.batch_size
        self.save_hyperparameters()

    def _loader(self, shuffle: bool = False) -> DataLoader:
        return DataLoader(_data(), batch_size=self.hparams.batch_size, shuffle=shuffle)


def test_the_size_may_live_in_hparams(tmp_path: Path) -> None:
    module = InHparams()
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module) == 8
    assert module.hparams.batch_size == 8 and not hasattr(module, "batch_size")


class Data(DataModule):
    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=self.batch_size)


def test_the_size_may_live_in_the_datamodule(tmp_path: Path) -> None:
    module, data = Net(limit=11), Data()
    del module.batch_size  # the module's train_dataloader() is not used: the DataModule's is
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, datamodule=data) == 8
    assert data.batch_size == 8 and _trials(module.tried) == [2, 4, 8, 16]
    # Both hold it: Lightning's lightning_setattr writes both (and its getattr reads the DataModule's).
    module, data = Net(limit=11, batch_size=64), Data()
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, data, init_val=4) == 8
    assert module.batch_size == data.batch_size == 8


@pytest.mark.parametrize("method", ["validate", "test", "predict"])
def test_the_evaluation_methods_search_with_their_loop(tmp_path: Path, method: str) -> None:
    module = Net(limit=11)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, method=method, mode="binsearch", margin=0) == 11
    assert _trials(module.tried) == [2, 4, 8, 16, 12, 10, 11] and module.training


def test_the_callback_in_validate_runs_the_validation_at_the_size_found(tmp_path: Path) -> None:
    module, finder = Net(limit=11), BatchSizeFinder(steps_per_trial=1)
    results = _trainer(tmp_path, callbacks=[finder]).validate(module, verbose=False)
    assert finder.optimal_batch_size == 8 and len(results) == 1
    assert module.tried == [2, 4, 8, 16] + [8] * 8  # then the whole validation, at 8


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"mode": "linear"},
            r"scale_batch_size\(mode='linear'\) is not valid. Valid choices: 'power', 'binsearch'",
        ),
        ({"steps_per_trial": 0}, r"scale_batch_size\(steps_per_trial=0\) must be an int >= 1"),
        ({"init_val": 0}, r"scale_batch_size\(init_val=0\) must be an int >= 1"),
        ({"max_trials": 0}, r"scale_batch_size\(max_trials=0\) must be an int >= 1"),
        ({"batch_arg_name": "bs"}, r"scale_batch_size\(batch_arg_name='bs'\): neither Net nor its hparams"),
        (
            {"method": "train"},
            r"scale_batch_size\(method='train'\) is not valid. Valid choices: 'fit', 'validate'",
        ),
        ({"dataloaders": [1]}, r"scale_batch_size\(method='fit'\) takes no dataloaders"),
        ({"train_dataloaders": DataLoader(_data())}, "dataloaders passed directly cannot be resized"),
    ],
)
def test_bad_arguments_raise_before_anything_runs(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    module = Net()
    with pytest.raises(ValueError, match=message):
        Tuner(_trainer(tmp_path)).scale_batch_size(module, **options)
    assert module.tried == [] and module.batch_size == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"margin": 1.0}, r"margin=1.0\) must be between 0 and 1"),
        ({"margin": -0.1}, r"margin=-0.1\) must be between 0 and 1"),
        ({"max_val": 0}, r"max_val=0\) must be an int >= 1"),
        ({"init_val": 64, "max_val": 32}, r"init_val=64\) is above max_val=32"),
    ],
)
def test_bad_margin_and_max_val_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSizeFinder(**options)
    with pytest.raises(ValueError, match=message):
        Tuner(_trainer(Path("unused"))).scale_batch_size(Net(), **options)


def test_the_callback_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"BatchSizeFinder\(mode='exponential'\) is not valid"):
        BatchSizeFinder(mode="exponential")
    module = Net()
    trainer = _trainer(tmp_path, callbacks=[BatchSizeFinder(batch_arg_name="bs")])
    with pytest.raises(ValueError, match=r"BatchSizeFinder\(batch_arg_name='bs'\)"):
        trainer.fit(module)
    trainer = _trainer(tmp_path, callbacks=[BatchSizeFinder()])
    with pytest.raises(ValueError, match="the dataloaders passed to fit.. cannot be resized"):
        trainer.fit(module, DataLoader(_data(), batch_size=4))
    assert module.tried == []


@pytest.mark.parametrize("exception", [ValueError("boom"), RuntimeError("CUDA error: device-side assert")])
def test_other_errors_propagate_and_leave_the_size(tmp_path: Path, exception: BaseException) -> None:
    module = Net(limit=5)
    module.exception = exception
    with pytest.raises(type(exception), match=str(exception.args[0])):
        Tuner(_trainer(tmp_path)).scale_batch_size(module)
    assert module.batch_size == 2 and _trials(module.tried) == [2, 4, 8]
    assert not any(tmp_path.iterdir())


def test_fast_dev_run_does_not_search(tmp_path: Path) -> None:
    module = Net()
    with pytest.warns(UserWarning, match="fast_dev_run"):
        assert Tuner(_trainer(tmp_path, fast_dev_run=True)).scale_batch_size(module) is None
    assert module.tried == [] and module.batch_size == 2


def test_a_resumed_fit_keeps_the_size_found(tmp_path: Path) -> None:
    first = _trainer(tmp_path, callbacks=[BatchSizeFinder(steps_per_trial=1)], enable_checkpointing=True,
                     max_epochs=1)  # fmt: skip
    first.fit(Net(limit=11))
    assert first.checkpoint_callback is not None
    module, finder = Net(limit=11), BatchSizeFinder(steps_per_trial=1)
    trainer = _trainer(tmp_path, callbacks=[finder], enable_checkpointing=True)
    trainer.fit(module, ckpt_path=first.checkpoint_callback.best_model_path)
    # No search: the epoch left, at the size the first fit found (8 training, then 8 validation batches).
    assert module.tried == [8] * 16 and finder.optimal_batch_size == module.batch_size == 8
    assert trainer.global_step == 16


# -- two processes ---------------------------------------------------------------------------------
class RankLimited(Net):
    """Rank 1 runs out of memory above 4, after the step's gradient all-reduce (in its optimizer
    step, as a first Adam step may): the other rank's step ran."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.global_rank == 1 and self.batch_size > 4:
            raise _out_of_memory("cuda")


def _ddp_worker(root: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, cls in (("both", Net), ("one", RankLimited)):
        torch.manual_seed(0)
        module = cls(limit=11)
        trainer = _trainer(Path(root), strategy="ddp", max_epochs=1)
        results[name] = Tuner(trainer).scale_batch_size(module, steps_per_trial=2)
        results[f"{name}_trials"] = _trials(module.tried)
        trainer.fit(module)
        results[f"{name}_weights"] = [p.flatten().tolist() for p in module.parameters()]
    results["scratch"] = os.listdir(root)
    return results


def test_two_processes_agree_on_the_size(tmp_path: Path) -> None:
    ranks = run_processes(_ddp_worker, str(tmp_path))
    assert ranks[0]["both"] == ranks[1]["both"] == 8  # out of memory on both, in training_step
    assert ranks[0]["one"] == ranks[1]["one"] == 4  # rank 1's failure failed the trial on rank 0 too
    assert ranks[0]["one_trials"] == ranks[1]["one_trials"] == [2, 4, 8]
    assert ranks[0]["both_weights"] == ranks[1]["both_weights"]
    assert ranks[0]["one_weights"] == ranks[1]["one_weights"]
    assert ranks[0]["scratch"] == []


class SkipsEveryStep(Net):
    # (a training_step returning None would not do: its batch is a step, as Lightning's)
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int:
        self.tried.append(len(batch[0]))
        return -1  # the epoch ends before its first batch: no optimizer step, in every epoch


@pytest.mark.timeout(60)
def test_a_trial_that_takes_no_step_ends_after_one_epoch(tmp_path: Path) -> None:
    module = SkipsEveryStep(n=12)
    assert Tuner(_trainer(tmp_path)).scale_batch_size(module, steps_per_trial=3) == 16  # as Lightning: grows
    assert module.tried == [2, 4, 8, 12]  # each trial one epoch (of no batch), not 3 steps' worth
