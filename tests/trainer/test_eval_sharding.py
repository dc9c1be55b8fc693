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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

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


def _evaluate_on_two_ranks(root: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from ember import Trainer, TrainModule

    data = TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1))

    class Model(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen: dict[str, list[int]] = {"val": [], "test": [], "own": []}

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
    return {"seen": module.seen, "val": val[0]["val_mean"], "test": test[0]["test_mean"]}


def test_validation_and_test_see_what_lightning_s_ranks_see(tmp_path: Path) -> None:
    ranks = run_processes(_evaluate_on_two_ranks, str(tmp_path))
    values = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    expected = [
        [i for batch in _lightning_batches(DataLoader(range(10), batch_size=4), 2, r) for i in batch]
        for r in range(2)
    ]
    assert [r["seen"] for r in ranks] == [{"val": e, "test": e, "own": e} for e in expected]
    # sync_dist: the mean over processes of each process's mean (no sample repeated: the dataset's)
    mean = sum(values[e].mean().item() for e in expected) / 2
    assert ranks[0]["val"] == ranks[1]["val"] == pytest.approx(mean)
    assert ranks[0]["test"] == pytest.approx(mean)
