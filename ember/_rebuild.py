"""How a prepared loader rebuilds the user's ``DataLoader`` around its own batch sampler: the same
settings (:mod:`ember.data`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from ember._workers import worker_init

__all__ = ["OneSample", "settings"]


class OneSample:
    """The collate function of a loader with ``batch_size=None``, for a plan of one-index batches:
    the sample alone, converted as that loader would (not a list of one sample)."""

    def __init__(self, collate_fn: Callable[[Any], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        return self.collate_fn(samples[0])


def settings(dl: DataLoader[Any], generator: torch.Generator | None) -> dict[str, Any]:
    """The keyword arguments that rebuild ``dl`` around another sampler, with ``generator``."""
    kwargs: dict[str, Any] = {
        "num_workers": dl.num_workers,
        "collate_fn": dl.collate_fn,
        "pin_memory": dl.pin_memory,
        "timeout": dl.timeout,
        "worker_init_fn": worker_init(dl.worker_init_fn, dl.num_workers, dl.multiprocessing_context),
        "multiprocessing_context": dl.multiprocessing_context,
        "generator": generator,
        "persistent_workers": dl.persistent_workers,
        "pin_memory_device": dl.pin_memory_device,
    }
    if dl.num_workers > 0:
        kwargs["prefetch_factor"] = dl.prefetch_factor
    if hasattr(dl, "in_order"):
        kwargs["in_order"] = dl.in_order
    return kwargs
