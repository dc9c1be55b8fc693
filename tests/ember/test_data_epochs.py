"""A prepared dataloader tells the user's sampler and dataset which epoch it runs, as 🤗 Accelerate's
does: a sampler or dataset that shuffles by its own ``set_epoch`` (a ``DistributedSampler``, a
streaming dataset with a shuffle buffer) reshuffles each epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ember.data import LoopState, PreparedDataLoader


class _EpochSampler(Sampler[int]):
    """Shuffles with a seed of its own plus the epoch it was last told (no ``generator`` attribute)."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(100 + self.epoch))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


class _EpochDataset(Dataset[int]):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        return index


class _EpochStream(IterableDataset[int]):
    """Yields 0..7 rotated by the epoch it was last told."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter([(i + self.epoch) % 8 for i in range(8)])


def _prepared(loader: DataLoader[int], rank: int = 0, world: int = 1) -> PreparedDataLoader:
    return PreparedDataLoader(
        loader, device=None, world_size=world, rank=rank, seed=0, even_batches=True, loop_state=LoopState()
    )


def _epochs(prepared: PreparedDataLoader, count: int) -> list[list[list[int]]]:
    return [[batch.tolist() for batch in prepared] for _ in range(count)]


def test_a_sampler_that_shuffles_by_epoch_reshuffles_each_epoch() -> None:
    sampler = _EpochSampler(8)
    prepared = _prepared(DataLoader(range(8), batch_size=4, sampler=sampler), rank=1, world=2)
    first, second = _epochs(prepared, 2)
    expected = [
        [torch.randperm(8, generator=torch.Generator().manual_seed(100 + e)).tolist()[4:]] for e in (0, 1)
    ]
    assert [first, second] == expected  # rank 1 of 2: the second batch of each epoch's order
    prepared.set_epoch(5)
    assert _epochs(prepared, 1)[0] == [
        torch.randperm(8, generator=torch.Generator().manual_seed(105)).tolist()[4:]
    ]
    assert sampler.epoch == 5


def test_the_dataset_is_told_the_epoch() -> None:
    dataset = _EpochDataset()
    prepared = _prepared(DataLoader(dataset, batch_size=4))
    _epochs(prepared, 2)
    prepared.set_epoch(7)
    _epochs(prepared, 1)
    assert dataset.epochs == [0, 1, 7]


def test_an_iterable_dataset_is_told_the_epoch() -> None:
    prepared = _prepared(DataLoader(_EpochStream(), batch_size=4))
    assert _epochs(prepared, 2) == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 0]]]
