"""The Trainer's validation and test loaders are sharded as Lightning's ``DistributedSampler`` shards
them: samples dealt in turn to the processes, the last round padded with at most ``world - 1``
samples from the start. (Dealing whole batches repeated up to ``world - 1`` whole batches, which
all counted in validation metrics.) Checked against ``torch.utils.data.DistributedSampler`` itself."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)

from ember.data import LoopState, PreparedDataLoader


def _lightning_batches(loader: DataLoader[Any], world: int, rank: int) -> list[list[int]]:
    """What Lightning's evaluation loader yields on ``rank``: the loader over a DistributedSampler."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)  # type: ignore[arg-type]
    sharded = DataLoader(
        loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, sampler=sampler
    )
    return [batch.tolist() for batch in sharded]


@pytest.mark.parametrize(("samples", "batch_size", "world", "drop_last"), [
    (n, b, w, d) for n, b, w, d in itertools.product([1, 2, 5, 9, 10, 13, 16], [1, 3, 4], [2, 3], [False, True])
])  # fmt: skip
def test_samples_are_dealt_as_a_distributed_sampler_deals_them(
    samples: int, batch_size: int, world: int, drop_last: bool
) -> None:
    loader = DataLoader(range(samples), batch_size=batch_size, drop_last=drop_last)
    for rank in range(world):
        prepared = PreparedDataLoader(
            loader, device=None, world_size=world, rank=rank, seed=0, even_batches=True,
            loop_state=LoopState(), shard_samples=True,
        )  # fmt: skip
        expected = _lightning_batches(loader, world, rank)
        assert [batch.tolist() for batch in prepared] == expected
        assert len(prepared) == len(expected)


def test_a_loader_without_batch_size_deals_single_samples() -> None:
    loader = DataLoader(range(5), batch_size=None)
    ranks = [
        PreparedDataLoader(
            loader,
            device=None,
            world_size=2,
            rank=r,
            seed=0,
            even_batches=True,
            loop_state=LoopState(),
            shard_samples=True,
        )
        for r in range(2)
    ]
    assert [[int(x) for x in p] for p in ranks] == [[0, 2, 4], [1, 3, 0]]
    assert [len(p) for p in ranks] == [3, 3]


class _Reversed(BatchSampler):
    """A custom batch sampler: its sampler's indices in batches, the batches in reverse order."""

    def __iter__(self) -> Any:
        return iter(list(super().__iter__())[::-1])


def _custom_loader(samples: int, batch_size: int, drop_last: bool) -> DataLoader[Any]:
    data = range(samples)
    return DataLoader(data, batch_sampler=_Reversed(SequentialSampler(data), batch_size, drop_last))  # type: ignore[arg-type]


def _prepared(loader: DataLoader[Any], world: int, rank: int, predicting: bool = False) -> PreparedDataLoader:
    return PreparedDataLoader(
        loader, device=None, world_size=world, rank=rank, seed=0, even_batches=True, loop_state=LoopState(),
        shard_samples=not predicting, unrepeated=predicting,
    )  # fmt: skip


@pytest.mark.parametrize(("samples", "batch_size", "world", "drop_last"), [
    (n, b, w, d) for n, b, w, d in itertools.product([1, 5, 9, 10], [1, 3], [2, 3], [False, True])
])  # fmt: skip
def test_a_custom_batch_sampler_batches_each_rank_s_share(
    samples: int, batch_size: int, world: int, drop_last: bool
) -> None:
    # As Lightning: the batch sampler gets a DistributedSamplerWrapper of the loader's sampler, so
    # each sample is evaluated once (the padding aside), not whole batches repeated.
    loader = _custom_loader(samples, batch_size, drop_last)
    for rank in range(world):
        share = list(DistributedSampler(range(samples), num_replicas=world, rank=rank, shuffle=False))  # type: ignore[arg-type]
        expected = list(_Reversed(share, batch_size, drop_last))  # type: ignore[arg-type]
        prepared = _prepared(loader, world, rank)
        assert [batch.tolist() for batch in prepared] == expected
        assert len(prepared) == len(expected)


@pytest.mark.parametrize("custom", [False, True])
def test_predict_deals_samples_unpadded_and_evens_out_the_steps(custom: bool) -> None:
    # Lightning's UnrepeatedDistributedSampler: rank r predicts samples r, r + 2, ... (none repeated).
    # ember gathers each step, so rank 1 runs one repeat batch more, which it marks as its own none of.
    loader = _custom_loader(9, 2, False) if custom else DataLoader(range(9), batch_size=2)
    shares = [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    mine = [[share[i : i + 2] for i in range(0, len(share), 2)] for share in shares]
    expected = [m[::-1] if custom else m for m in mine]
    for rank in range(2):
        prepared = _prepared(loader, 2, rank, predicting=True)
        seen, repeats = [], []
        for batch in prepared:
            seen.append(batch.tolist())
            repeats.append(prepared._own_samples == 0)
        assert seen[: len(expected[rank])] == expected[rank]
        assert len(seen) == len(prepared) == 3
        assert repeats == [False, False, rank == 1]


class _Batches(Sampler[list[int]]):
    """A batch sampler with no ``sampler`` to give a share to: its batches are dealt whole."""

    def __iter__(self) -> Any:
        return iter([[0, 1], [2, 3], [4]])

    def __len__(self) -> int:
        return 3


def test_a_batch_sampler_without_a_sampler_is_dealt_whole_batches() -> None:
    loader = DataLoader(range(5), batch_sampler=_Batches())
    assert [[b.tolist() for b in _prepared(loader, 2, r)] for r in range(2)] == [
        [[0, 1], [4]],
        [[2, 3], [0, 1]],
    ]


def _evaluate_on_two_ranks(root: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from ember import Trainer, TrainModule

    data = TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1))

    class Model(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen: dict[str, list[int]] = {"val": [], "test": [], "own": [], "custom": []}

        def _evaluate(self, kind: str, batch: Any) -> None:
            kind = "own" if self.own_sampler else kind
            self.seen[kind] += batch[0].squeeze(1).int().tolist()
            self.log(f"{kind}_mean", batch[0].mean(), sync_dist=True, batch_size=len(batch[0]))

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._evaluate("val", batch)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._evaluate("test", batch)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return F.mse_loss(self.layer(batch[0]), batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = Trainer(devices=2, strategy="ddp", default_root_dir=root, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    module = Model()
    module.own_sampler = False
    val = trainer.validate(module, DataLoader(data, batch_size=4), verbose=False)
    test = trainer.test(module, DataLoader(data, batch_size=4), verbose=False)
    # A DistributedSampler of the user's own shards already: as Lightning, no second sharding
    module.own_sampler = True
    trainer.validate(module, DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False)))
    # A custom batch sampler batches each process's share of the samples (as Lightning)
    module.own_sampler = False
    seen = {k: list(v) for k, v in module.seen.items()}
    module.seen["val"] = []
    batches = _Reversed(SequentialSampler(data), 4, False)
    custom = trainer.validate(module, DataLoader(data, batch_sampler=batches), verbose=False)
    seen["custom"] = module.seen["val"]
    return {
        "seen": seen,
        "val": val[0]["val_mean"],
        "test": test[0]["test_mean"],
        "custom": custom[0]["val_mean"],
    }


def test_validation_and_test_see_what_lightning_s_ranks_see(tmp_path: Path) -> None:
    ranks = run_processes(_evaluate_on_two_ranks, str(tmp_path))
    values = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    expected = [
        [i for batch in _lightning_batches(DataLoader(range(10), batch_size=4), 2, r) for i in batch]
        for r in range(2)
    ]
    # (the custom batch sampler: the same shares, its batches reversed)
    custom = [[i for batch in _Reversed(e, 4, False) for i in batch] for e in expected]  # type: ignore[arg-type]
    assert [r["seen"] for r in ranks] == [
        {"val": e, "test": e, "own": e, "custom": c} for e, c in zip(expected, custom, strict=True)
    ]
    # sync_dist: the mean over processes of each process's mean (no sample repeated: the dataset's)
    mean = sum(values[e].mean().item() for e in expected) / 2
    assert ranks[0]["val"] == ranks[1]["val"] == pytest.approx(mean)
    assert ranks[0]["test"] == ranks[0]["custom"] == pytest.approx(mean)


def test_gathered_predictions_are_put_back_in_the_sampler_s_order() -> None:
    from ember.trainer.predict_loop import _in_order

    # 5 samples on 2 ranks in batches of 2: step 0 gathers rank 0's [0, 2] then rank 1's [1, 3]
    ranks = [_prepared(DataLoader(range(5), batch_size=2), 2, r, predicting=True) for r in range(2)]
    iterators = [iter(r) for r in ranks]
    gathered = torch.cat([next(it) for it in iterators])
    order = ranks[0]._gathered_order
    assert gathered.tolist() == [0, 2, 1, 3] and order == ranks[1]._gathered_order
    # rows of every tensor (a list of two tensors is not two samples), and objects joined in one list
    rows = _in_order([gathered, gathered * 10, torch.tensor(7)], order)
    assert [t.tolist() for t in rows] == [[0, 1, 2, 3], [0, 10, 20, 30], 7]
    assert _in_order(["0", "2", "1", "3"], order) == ["0", "1", "2", "3"]
