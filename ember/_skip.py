"""``skip_first_batches``: a dataloader's next passes without their first batches (Accelerate's)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from ember._rebuild import settings as _settings
from ember.data import PreparedDataLoader

__all__ = ["skip_first_batches"]


class _SkippedDataLoader:
    """The next pass of a prepared loader, starting at batch ``n`` (nothing before it is loaded)."""

    def __init__(self, dataloader: PreparedDataLoader, n: int) -> None:
        self.dataloader, self.n = dataloader, n

    def __iter__(self) -> Iterator[Any]:
        self.dataloader._resume_position = self.n
        return iter(self.dataloader)

    def __len__(self) -> int:
        return max(len(self.dataloader) - self.n, 0)

    def __getattr__(self, name: str) -> Any:  # the loader's own: dataset, batch_size, set_epoch ...
        if name in ("dataloader", "n"):  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.dataloader, name)


class _SkippedIterable:
    """An iterable without its first ``n`` items (any iterable, or a batch sampler); its other
    attributes are the iterable's."""

    def __init__(self, iterable: Any, n: int) -> None:
        self.iterable, self.n = iterable, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.iterable), self.n, None)

    def __len__(self) -> int:
        return max(len(self.iterable) - self.n, 0)  # a TypeError when the iterable has no length

    def __getattr__(self, name: str) -> Any:
        if name in ("iterable", "n"):
            raise AttributeError(name)
        return getattr(self.iterable, name)


def skip_first_batches(dataloader: Any, num_batches: int) -> Iterable[Any]:
    """An iterable over ``dataloader`` without its first ``num_batches`` batches."""
    if num_batches < 0:
        raise ValueError(f"num_batches={num_batches} must be >= 0")
    if isinstance(dataloader, PreparedDataLoader):
        return _SkippedDataLoader(dataloader, num_batches)
    if (
        isinstance(dataloader, DataLoader)
        and dataloader.batch_sampler is not None
        and not isinstance(dataloader.dataset, IterableDataset)
    ):
        batch_sampler = dataloader.batch_sampler
        assert batch_sampler is not None  # checked above
        return DataLoader(
            dataloader.dataset,
            batch_sampler=_SkippedIterable(batch_sampler, num_batches),
            **_settings(dataloader, dataloader.generator),
        )
    return _SkippedIterable(dataloader, num_batches)
