"""Training on several dataloaders (Lightning's CombinedLoader): batches, counts and exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from ember.callbacks import ModelCheckpoint
from ember.trainer import CombinedLoader, Trainer, TrainModule

A = TensorDataset(
    torch.arange(10.0).reshape(5, 2).repeat(2, 1) + torch.arange(10.0)[:, None]
)  # 5 batches of 2
B = TensorDataset(torch.linspace(-1, 1, 12).reshape(6, 2))  # 3 batches of 2


class TwoHeads(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.seen: list[tuple[list[float], list[float]]] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        (a,), (b,) = (batch["a"], batch["b"]) if isinstance(batch, dict) else batch
        self.seen.append((a[:, 0].tolist(), b[:, 0].tolist()))
        return self.net(a).pow(2).mean() + (self.net(b) - 1).pow(2).mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _trainer(root: Path, **kwargs: object) -> Trainer:
    return Trainer(default_root_dir=str(root), logger=False, enable_progress_bar=False,
                   enable_model_summary=False, **{"enable_checkpointing": False, **kwargs})  # fmt: skip


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(A, batch_size=2, shuffle=True), DataLoader(B, batch_size=2, shuffle=True)


def _shuffled(data: TensorDataset, seed: int) -> list[torch.Tensor]:
    """A prepared loader's pass ``e`` of ``data``: shuffled by a generator seeded ``seed + e``."""
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    return [x for (x,) in DataLoader(data, batch_size=2, sampler=sampler)]


def _reference(module: TwoHeads, epochs: int, mode: str) -> None:
    """A plain loop: each epoch zips A with B; max_size_cycle starts B again (its next epoch's order)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for epoch in range(epochs):
        a = _shuffled(A, 42 + epoch)
        b = (
            _shuffled(B, 42 + epoch) + _shuffled(B, 42 + epoch + 1)
            if mode == "max_size_cycle"
            else _shuffled(B, 42 + epoch)
        )
        for x, y in zip(a, b, strict=False):
            loss = module.net(x).pow(2).mean() + (module.net(y) - 1).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("form", ["list", "dict", "min_size"])
def test_fit_on_several_loaders_matches_a_plain_loop(tmp_path: Path, form: str) -> None:
    torch.manual_seed(42)  # the loaders' shuffle seed
    module, reference = TwoHeads(), TwoHeads()
    reference.load_state_dict(module.state_dict())
    a, b = _loaders()
    data = {"list": [a, b], "dict": {"a": a, "b": b}, "min_size": CombinedLoader([a, b], "min_size")}[form]
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, data)
    mode = "min_size" if form == "min_size" else "max_size_cycle"
    _reference(reference, 2, mode)
    per_epoch = 3 if form == "min_size" else 5
    assert trainer.num_training_batches == per_epoch and trainer.global_step == 2 * per_epoch
    assert trainer.estimated_stepping_batches == 2 * per_epoch
    assert isinstance(trainer.train_dataloader, dict if form == "dict" else list)
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_limit_train_batches_and_max_size(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=4)
    module = TwoHeads()
    trainer.fit(module, list(_loaders()))
    assert trainer.num_training_batches == 4 and len(module.seen) == 4

    seen: list[object] = []

    class Nones(TwoHeads):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(batch[1] is None)
            return self.net(batch[0][0]).sum()

    _trainer(tmp_path, max_epochs=1).fit(Nones(), CombinedLoader(list(_loaders()), "max_size"))
    assert seen == [False, False, False, True, True]  # B (3 batches) is exhausted: None


def test_sequential_and_unknown_modes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode='sequential'.*max_size_cycle, min_size, max_size"):
        _trainer(tmp_path, max_epochs=1).fit(TwoHeads(), CombinedLoader(list(_loaders()), "sequential"))
    with pytest.raises(ValueError, match="mode='zip'.*min_size, max_size_cycle, max_size, sequential"):
        CombinedLoader(list(_loaders()), "zip")


def test_combined_loader_iterates_as_lightnings() -> None:
    a, b = range(1, 4), range(10, 30, 10)  # (a list would be a collection of iterables, as in Lightning)
    assert list(CombinedLoader([a, b], "max_size_cycle")) == [
        ([1, 10], 0, 0),
        ([2, 20], 1, 0),
        ([3, 10], 2, 0),
    ]
    assert list(CombinedLoader({"a": a, "b": b})) == [({"a": 1, "b": 10}, 0, 0), ({"a": 2, "b": 20}, 1, 0)]
    assert list(CombinedLoader([a, b], "sequential")) == [
        (1, 0, 0),
        (2, 1, 0),
        (3, 2, 0),
        (10, 0, 1),
        (20, 1, 1),
    ]
    assert len(CombinedLoader([a, b], "max_size")) == 3


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("checkpoint", ["epoch=0-step=4", "epoch=1-step=8"])
def test_mid_epoch_resume_gives_the_same_next_batches(tmp_path: Path, checkpoint: str) -> None:
    # Step 4: B in its second pass of epoch 0; step 8: B just exhausted in epoch 1 (starts again next).
    def run(root: Path, **kwargs: object) -> tuple[TwoHeads, Trainer]:
        torch.manual_seed(42)
        module = TwoHeads()
        trainer = _trainer(root, max_epochs=2, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)])  # fmt: skip
        trainer.fit(module, list(_loaders()), **kwargs)
        return module, trainer

    full, _ = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / checkpoint
    assert ckpt.exists()
    resumed, trainer = run(tmp_path / "b", ckpt_path=str(ckpt))
    done = int(checkpoint.rsplit("=", 1)[1])
    assert resumed.seen == full.seen[done:] and trainer.global_step == 10
    for ours, theirs in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_crash_mid_batch_resumes_that_batch(tmp_path: Path) -> None:
    class Crash(TwoHeads):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.trainer.global_step == 6:
                raise RuntimeError("simulated crash")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(42)
    trainer = _trainer(tmp_path, max_epochs=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(Crash(), list(_loaders()))
    loader = trainer._train_loader
    assert loader is not None and loader.state_dict() == {"epoch": 1, "position": 1}
    assert [inner.state_dict()["position"] for inner in trainer.train_dataloader] == [1, 1]
    assert list(itertools.islice(iter(loader), 1))  # the batch can be fetched again


class _Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """8 samples, no ``__len__``: 4 batches of 2."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(16.0).reshape(8, 2) / 16)


class _StreamHeads(TwoHeads):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        a, b = batch
        self.seen.append((a[:, 0].tolist(), None if b is None else b[0][:, 0].tolist()))
        return self.net(a).pow(2).mean() + (0 if b is None else self.net(b[0]).pow(2).mean())


@pytest.mark.parametrize(("mode", "batches"), [("max_size_cycle", 4), ("min_size", 3), ("max_size", 4)])
def test_a_loader_without_a_length_trains_as_in_lightning(tmp_path: Path, mode: str, batches: int) -> None:
    # As Lightning: the combined length is unknown (infinite) unless min_size bounds it; the epoch ends
    # where the mode ends (max_size_cycle: every loader exhausted once, the shorter ones started again).
    module = _StreamHeads()
    stream, sized = DataLoader(_Stream(), batch_size=2), DataLoader(B, batch_size=2)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, CombinedLoader([stream, sized], mode))
    assert trainer.num_training_batches == (3 if mode == "min_size" else float("inf"))
    assert trainer.global_step == 2 * batches and len(module.seen) == 2 * batches
    assert [a[0] for a, _ in module.seen[:batches]] == [0.0, 0.25, 0.5, 0.75][:batches]
    bs = [b for _, b in module.seen[:batches]]
    if mode == "max_size":
        assert bs[3] is None and None not in bs[:3]
    else:
        assert None not in bs


def test_batch_transfer_hooks_get_the_combined_batch_with_dataloader_idx_0(tmp_path: Path) -> None:
    # As Lightning's training loop: each hook runs once per combined batch, on the whole collection.
    calls: list[tuple[str, type, list[str], int]] = []

    class Hooked(TwoHeads):
        def _note(self, name: str, batch: Any, dataloader_idx: int) -> None:
            calls.append((name, type(batch), sorted(batch), dataloader_idx))

        def on_before_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
            self._note("before", batch, dataloader_idx)
            return batch

        def transfer_batch_to_device(self, batch, device, dataloader_idx):  # type: ignore[no-untyped-def]
            self._note("transfer", batch, dataloader_idx)
            return batch

        def on_after_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
            self._note("after", batch, dataloader_idx)
            return batch

    a, b = _loaders()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(Hooked(), {"a": a, "b": b})
    one = [(name, dict, ["a", "b"], 0) for name in ("before", "transfer", "after")]
    assert calls == one * 2


def _fit_combined_on_two_ranks(root: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in ("max_size_cycle", "min_size", "max_size"):

        class Recorder(TwoHeads):
            def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
                a, b = batch
                self.seen.append([a[0][:, 0].tolist(), None if b is None else b[0][:, 0].tolist()])
                loss = self.net(a[0]).pow(2).mean()
                return loss + (0 if b is None else (self.net(b[0]) - 1).pow(2).mean())

        loaders = [DataLoader(A, batch_size=2), DataLoader(B, batch_size=2)]  # 5 and 3 batches
        trainer = _trainer(Path(root), max_epochs=1, strategy="ddp", devices=2)
        module = Recorder()
        trainer.fit(module, CombinedLoader(loaders, mode))
        results[mode] = {
            "seen": module.seen,
            "batches": trainer.num_training_batches,
            "step": trainer.global_step,
        }
    return results


def test_two_ranks_each_train_on_their_share_of_every_loader(tmp_path: Path) -> None:
    from dist_helpers import run_processes

    ranks = run_processes(_fit_combined_on_two_ranks, str(tmp_path))
    a = [[float(v) for v in x[:, 0].tolist()] for (x,) in DataLoader(A, batch_size=2)]
    b = [[float(v) for v in x[:, 0].tolist()] for (x,) in DataLoader(B, batch_size=2)]
    # Each rank takes every other batch of each loader (A: 5 -> 3 a rank, the last evened out from
    # the start; B: 3 -> 2 a rank); both ranks run the same number of steps, so nothing hangs.
    shares = {"a": [[a[0], a[2], a[4]], [a[1], a[3], a[0]]], "b": [[b[0], b[2]], [b[1], b[0]]]}
    steps = {"max_size_cycle": 3, "min_size": 2, "max_size": 3}
    for mode, count in steps.items():
        for rank, result in enumerate(r[mode] for r in ranks):
            assert result["batches"] == result["step"] == len(result["seen"]) == count
            assert [s[0] for s in result["seen"]] == shares["a"][rank][:count]
            mine_b = shares["b"][rank]
            expected_b = {
                "max_size_cycle": [*mine_b, mine_b[0]],
                "min_size": mine_b,
                "max_size": [*mine_b, None],
            }
            assert [s[1] for s in result["seen"]] == expected_b[mode]
