"""DataLoader workers started by a forkserver exit with the process that iterates the loader.

A DataLoader worker watches its parent process and exits when the parent is gone. A worker started
by a forkserver is the *server's* child, not the child of the process iterating the loader (a rank):
when a rank is killed (SIGKILL, ``os._exit``, the OOM killer), its workers keep waiting for work, and
the server, which lives as long as any process that can reach it, waits for them. Both outlive the
rank, holding its output pipes open, so a launcher reading them never sees the end.

``worker_init`` wraps the user's ``worker_init_fn`` for such loaders: the worker starts a thread that
waits for the iterating process to end and then ends the worker.

``SeededFetch`` is a map-style dataset as a prepared loader's workers fetch it: before each planned
batch (``PlannedBatch``) the worker seeds its generators from the batch's place in the epoch plan.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["PlannedBatch", "SeededFetch", "seed_for_batch", "worker_init"]


def worker_init(
    fn: Callable[[int], None] | None, num_workers: int, context: Any
) -> Callable[[int], None] | None:
    """``fn``, or ``fn`` behind :class:`_ExitWithIterator` when the workers start from a forkserver."""
    if num_workers == 0 or isinstance(fn, _ExitWithIterator) or _start_method(context) != "forkserver":
        return fn
    return _ExitWithIterator(fn)


def _start_method(context: Any) -> str:
    if context is not None:
        return str(context.get_start_method())
    # Without a context a DataLoader uses the default one; the first method listed is the default.
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


class _ExitWithIterator:
    """A ``worker_init_fn``: watch the process that started this worker, then run the user's."""

    def __init__(self, fn: Callable[[int], None] | None) -> None:
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid is not None:
            threading.Thread(
                target=_exit_when_gone, args=(parent.pid,), name="ember-rank-watch", daemon=True
            ).start()
        if self.fn is not None:
            self.fn(worker_id)


def _exit_when_gone(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)  # readable once the process has ended (Linux 5.3+)
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([handle], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class PlannedBatch(list[int]):
    """The indices of one batch and its place in the epoch plan: (seed, epoch, rank, position)."""

    def __init__(self, indices: list[int], place: tuple[int, int, int, int]) -> None:
        super().__init__(indices)
        self.place = place


class SeededFetch(Dataset[Any]):
    """The user's map-style dataset, as a worker process fetches it: each batch with its own seeds.

    Before fetching a planned batch, the worker seeds ``random``, NumPy and torch from the batch's
    place in the plan. Nothing changes in the main process (``num_workers=0`` draws from the main
    process's generators, whose states are checkpointed).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        place = getattr(indices, "place", None)
        if place is not None and get_worker_info() is not None:
            seed_for_batch(place)
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return getitems(list(indices))
        return [self.dataset[i] for i in indices]

    def __getattr__(self, name: str) -> Any:  # a worker_init_fn may look at the dataset's attributes
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seed_for_batch(place: tuple[int, int, int, int]) -> None:
    import random

    import numpy as np

    words = np.random.SeedSequence(list(place)).generate_state(4, dtype=np.uint32)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))
    torch.manual_seed(int(words[2]) << 32 | int(words[3]))
