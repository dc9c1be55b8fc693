"""What a prepared loader does to the user's samplers: seeded copies, ``set_epoch``, the checks of
``split_batches`` (:mod:`ember.data`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["check_splittable", "rebatched", "takes_a_sampler", "tell_epoch", "with_generator"]


def with_generator(sampler: Any, generator: torch.Generator) -> Any:
    """A shallow copy of ``sampler`` (and of a wrapped sampler) that draws from ``generator``."""
    sampler = copy.copy(sampler)
    if hasattr(sampler, "generator"):
        sampler.generator = generator
    inner = getattr(sampler, "sampler", None)
    if inner is not None and hasattr(inner, "generator"):
        sampler.sampler = with_generator(inner, generator)
    return sampler


def takes_a_sampler(batch_sampler: Any) -> bool:
    """Whether ``batch_sampler`` batches the indices of a ``sampler`` attribute that can be replaced
    (``BatchSampler`` and its subclasses do), so that it can batch one process's share of them."""
    return batch_sampler is not None and getattr(batch_sampler, "sampler", None) is not None


def rebatched(batch_sampler: Any, indices: list[int]) -> Any:
    """A shallow copy of ``batch_sampler`` that batches ``indices`` (its ``sampler`` replaced), as
    Lightning gives a custom batch sampler a ``DistributedSamplerWrapper`` to batch."""
    batch_sampler = copy.copy(batch_sampler)
    batch_sampler.sampler = indices
    return batch_sampler


def check_splittable(dl: DataLoader[Any], world_size: int) -> None:
    """``split_batches`` needs global batches that divide into ``world_size`` equal slices."""
    if dl.batch_size is None and (dl.batch_sampler is None or isinstance(dl.dataset, IterableDataset)):
        raise ValueError(
            "split_batches=True needs a dataloader that makes batches; this one has batch_size=None "
            "(it yields single samples)"
        )
    if dl.batch_size is not None and dl.batch_size % world_size:
        raise ValueError(
            f"split_batches=True needs the dataloader's batch_size ({dl.batch_size}) to be a multiple of the "
            f"number of processes ({world_size}): each process gets batch_size / {world_size} samples per step"
        )


def tell_epoch(dl: DataLoader[Any], epoch: int) -> None:
    """Call ``set_epoch(epoch)`` of the loader's samplers and dataset that have one (each once), as
    🤗 Accelerate does: a ``DistributedSampler`` or a streaming dataset's shuffle then changes by epoch."""
    told: set[int] = set()
    for part in (dl.sampler, dl.batch_sampler, getattr(dl.batch_sampler, "sampler", None), dl.dataset):
        set_epoch = getattr(part, "set_epoch", None)
        if callable(set_epoch) and id(part) not in told:
            told.add(id(part))
            set_epoch(epoch)
