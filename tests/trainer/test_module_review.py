"""TrainModule's Lightning API where it differed from Lightning 2.6: ``optimizers(use_pl_optimizer=...)``,
``clip_gradients`` of one of several optimizers, ``all_gather`` of numbers and with a group, and
``load_from_checkpoint``'s ``map_location``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    quiet = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
    }
    return Trainer(default_root_dir=str(tmp_path), **{**quiet, **kwargs})


def _data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)), batch_size=4)  # fmt: skip


class TwoOptimizers(TrainModule):
    """Manual optimization: two linear heads, one optimizer each, both losses backward at once."""

    automatic_optimization = False

    def __init__(self, clip: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)
        self.clip = clip
        self.seen: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        if self.clip is None:
            self.seen.append((self.optimizers(use_pl_optimizer=False), self.trainer.optimizers))
        loss = ((self.a(x) - y) ** 2).mean() + ((self.b(x) - y) ** 2).mean()
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        grads = [p.grad.clone() for p in self.parameters()]
        self.clip_gradients(opt_a, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        self.seen.append((grads, [p.grad.clone() for p in self.parameters()]))
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_optimizers_use_pl_optimizer_false_returns_the_users_optimizers(tmp_path: Path) -> None:
    module = TwoOptimizers()
    _trainer(tmp_path, max_steps=2).fit(module, _data())
    raw, users = module.seen[0]
    assert isinstance(raw, list) and all(a is b for a, b in zip(raw, users, strict=True))
    assert all(type(o) is torch.optim.SGD for o in raw)


def test_clip_gradients_clips_only_the_given_optimizers_parameters(tmp_path: Path) -> None:
    module = TwoOptimizers(clip=0.01)
    _trainer(tmp_path, max_steps=2).fit(module, _data())
    before, after = module.seen[0]
    a_before, b_before = before[:2], before[2:]
    plain = [nn.Parameter(torch.zeros_like(g)) for g in a_before]  # a plain torch clip of a's alone
    for param, grad in zip(plain, a_before, strict=True):
        param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(plain, 0.01)
    for got, param in zip(after[:2], plain, strict=True):
        torch.testing.assert_close(got, param.grad)
    for got, want in zip(after[2:], b_before, strict=True):  # the other optimizer's: untouched
        torch.testing.assert_close(got, want)


# -- all_gather ---------------------------------------------------------------------------------------
class Gathers(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank = self.global_rank
        number = self.all_gather(float(rank))
        nested = self.all_gather({"n": rank, "t": torch.tensor([rank, rank + 1])})
        grouped = self.all_gather(torch.tensor([float(rank)]), group=torch.distributed.group.WORLD)
        self.seen = {
            "number": [type(number).__name__, number.tolist()],
            "nested": {key: value.tolist() for key, value in nested.items()},
            "grouped": grouped.tolist(),
        }
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_all_gather_of_a_number_on_one_process_is_a_tensor(tmp_path: Path) -> None:
    module = Gathers()
    module.training_step = lambda batch, i: (  # type: ignore[method-assign]
        module.seen.update(n=module.all_gather(3.0), i=module.all_gather([True, 2]))
        or module.net(batch[0]).sum()
    )
    _trainer(tmp_path, max_steps=1).fit(module, _data())
    assert torch.equal(module.seen["n"], torch.tensor(3.0))  # as Lightning: a tensor, not stacked
    assert [t.dtype for t in module.seen["i"]] == [torch.uint8, torch.int32]


def _gather_worker(root: str) -> Any:
    module = Gathers()
    _trainer(Path(root), strategy="ddp", max_steps=1).fit(module, _data())
    return module.seen


def test_all_gather_on_two_processes_gathers_numbers_and_takes_a_group(tmp_path: Path) -> None:
    results = run_processes(_gather_worker, str(tmp_path))
    for seen in results:
        assert seen["number"] == ["Tensor", [0.0, 1.0]]  # each process's number, not its own alone
        assert seen["nested"] == {"n": [0, 1], "t": [[0, 1], [1, 2]]}
        assert seen["grouped"] == [[0.0], [1.0]]


# -- load_from_checkpoint -----------------------------------------------------------------------------
class Saved(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("map_location", [{"cuda:0": "cpu"}, lambda storage, location: storage])
def test_load_from_checkpoint_names_a_map_location_it_cannot_follow(
    tmp_path: Path, map_location: Any
) -> None:
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(Saved(), _data())
    path = next((tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(map_location=.*valid choices are a device"):
        Saved.load_from_checkpoint(path, map_location=map_location)
    assert Saved.load_from_checkpoint(path, map_location="cpu").device == torch.device("cpu")


def test_device_after_a_fit_is_where_the_module_was_moved(tmp_path: Path) -> None:
    module = Saved()
    seen = []
    module.on_train_start = lambda: seen.append(module.device)  # type: ignore[method-assign]
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _data())
    assert seen == [trainer.accelerator.device]
    module.to("meta")  # (as a module.cpu() after a fit on a GPU: to_onnx/to_torchscript move examples there)
    assert module.device == torch.device("meta")  # as Lightning's, not the fit's device


def test_manual_backward_under_automatic_optimization_names_the_setting(tmp_path: Path) -> None:
    module = Saved()
    module.training_step = lambda batch, i: module.manual_backward(module.net(batch[0]).sum())  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"manual_backward\(\) needs manual optimization: set Saved.automatic_optimization = False"):  # fmt: skip
        _trainer(tmp_path, max_steps=1).fit(module, _data())


class ClipUnderMixed(TwoOptimizers):
    """Both losses backward, ``clip_gradients`` of the first optimizer (a bound it never reaches),
    then both steps: the clip must change nothing, the other optimizer's gradients included."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = ((self.a(x) - y) ** 2).mean() + ((self.b(x) - y) ** 2).mean()
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        if self.clip is not None:
            self.clip_gradients(opt_a, gradient_clip_val=self.clip)
        opt_a.step()
        opt_b.step()


def test_clip_gradients_under_16_mixed_unscales_only_the_given_optimizer(tmp_path: Path) -> None:
    clipped, plain = ClipUnderMixed(clip=1e6), ClipUnderMixed()
    _trainer(tmp_path / "a", max_steps=3, precision="16-mixed").fit(clipped, _data())
    _trainer(tmp_path / "b", max_steps=3, precision="16-mixed").fit(plain, _data())
    for got, want in zip(clipped.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want)  # (b's gradients were unscaled twice: b barely moved)


class _Built(TrainModule):
    """Builds its layer in configure_model (Lightning's hook for large or sharded models)."""

    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Linear(4, self.hparams.hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.net is not None
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self) -> Any:  # one callback, not a list (Lightning accepts it)
        from ember.callbacks import LambdaCallback

        return LambdaCallback(on_fit_start=lambda trainer, module: setattr(module, "started", True))


def test_load_from_checkpoint_runs_configure_model_and_one_configured_callback_is_taken(
    tmp_path: Path,
) -> None:
    module = _Built()
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(module, _data())
    assert module.started  # type: ignore[attr-defined]
    assert trainer.checkpoint_callback is not None
    loaded = _Built.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert loaded.net is not None and module.net is not None  # built before the weights were loaded
    assert torch.equal(loaded.net.weight, module.net.weight)
