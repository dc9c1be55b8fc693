"""Which samples of a rank's last batch are repeats that even out the last step (``even_batches``):
the prepared loader tells, so that a prediction writer keeps each sample once, as Lightning's
unrepeated predict sampler does. A loader is built for one rank of two (no process group needed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from ember.data import LoopState, PreparedDataLoader


class _Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(7))


def _own_per_batch(loader: DataLoader[int], rank: int, **kwargs: bool) -> list[tuple[list[int], int | None]]:
    prepared = PreparedDataLoader(
        loader,
        device=None,
        world_size=2,
        rank=rank,
        seed=0,
        even_batches=True,
        loop_state=LoopState(),
        **kwargs,
    )
    return [(batch.tolist(), prepared._own_samples) for batch in prepared]


@pytest.mark.parametrize("stream", [False, True])
def test_a_whole_repeated_batch_has_no_own_sample(stream: bool) -> None:
    data = _Stream() if stream else range(7)
    # 4 global batches of 2, 2 steps of 2: nothing repeated.
    assert _own_per_batch(DataLoader(data, batch_size=2), 1) == [([2, 3], None), ([6], None)]
    # 3 global batches of 3: rank 1 repeats batch 0 in the last step, none of it its own.
    assert _own_per_batch(DataLoader(data, batch_size=3), 0) == [([0, 1, 2], None), ([6], 1)]
    assert _own_per_batch(DataLoader(data, batch_size=3), 1) == [([3, 4, 5], None), ([0, 1, 2], 0)]


def test_a_batch_samplers_batches_of_any_size() -> None:
    loader = DataLoader(range(7), batch_sampler=[[0], [1, 2, 3, 4], [5, 6]])
    assert _own_per_batch(loader, 0) == [([0], None), ([5, 6], 2)]
    assert _own_per_batch(loader, 1) == [([1, 2, 3, 4], None), ([0], 0)]


def test_split_batches_count_the_real_part_of_a_filled_slice() -> None:
    # Global batches of 4: [0..3] [4, 5, 6] filled with 0 to 4 samples; rank 1's slice [6, 0] holds one.
    loader = DataLoader(range(7), batch_size=4)
    assert _own_per_batch(loader, 0, split_batches=True) == [([0, 1], None), ([4, 5], 2)]
    assert _own_per_batch(loader, 1, split_batches=True) == [([2, 3], None), ([6, 0], 1)]


def test_nothing_is_repeated_when_the_last_step_is_full() -> None:
    assert _own_per_batch(DataLoader(torch.arange(8), batch_size=2), 1) == [([2, 3], None), ([6, 7], None)]
