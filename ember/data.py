"""Prepared dataloaders: sharded across ranks, batches on the device, position and shuffle seed owned.

A prepared loader keeps the user's ``DataLoader`` settings (dataset, batch size, shuffle, drop_last,
collate_fn, workers) and changes three things:

1. **Sharding by batch.** Each epoch the user's batch sampler produces the global list of batches;
   step ``s`` hands batch ``s * world_size + rank`` to each rank (with ``split_batches``, slice
   ``rank`` of global batch ``s``: the loader's batch size is then the global one). With
   ``even_batches`` (the default) an incomplete last round is completed from the start of the
   epoch, so every rank runs the same number of steps; :meth:`Accelerator.gather_for_metrics` drops
   those duplicates. The plan is ``ember._plan``.
2. **An owned shuffle seed.** The sampler's generator is re-seeded with ``seed + epoch`` before each
   epoch, the same on every rank (a sampler's or dataset's ``set_epoch`` is called with the epoch),
   and the loader's own generator seeds the workers. No draw is
   taken from the global RNG, so the training randomness stream is the same whether or not a run
   was resumed.
3. **A position.** The loader counts the batches it has yielded in the current epoch. Its
   ``state_dict`` (seed, epoch, position) goes into ``save_state``; after ``load_state`` the next pass
   yields the rest of the interrupted epoch, without loading the skipped batches.

With worker processes (``num_workers > 0``), a worker seeds Python's ``random``, NumPy and torch
before it fetches a batch, from (seed, epoch, rank, position in the epoch). Random draws in the
dataset (augmentation) are then a function of the batch, not of which worker fetched it or of how
many batches that worker fetched before, so a pass resumed in the middle of an epoch draws what the
uninterrupted pass drew.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ember._plan import (
    batch_share,
    deal,
    even_out,
    gathered_positions,
    own_samples,
    rank_plan,
    sample_length,
    split_length,
)
from ember._rebuild import OneSample, settings
from ember._samplers import check_splittable, rebatched, takes_a_sampler, tell_epoch, with_generator
from ember._tree import move_batches
from ember._workers import PlannedBatch, SeededFetch

__all__ = ["PreparedDataLoader"]


@dataclass(slots=True)
class LoopState:
    """The prepared loaders whose passes are running, innermost last (an eval loop inside training)."""

    running: list[PreparedDataLoader] = field(default_factory=list)

    @property
    def end_of_dataloader(self) -> bool:
        """True while the innermost running pass is at its last batch."""
        return bool(self.running) and self.running[-1]._at_end

    @property
    def remainder(self) -> int | None:
        """Real (not duplicated) samples of the current global step, or None when it holds no duplicates."""
        return self.running[-1]._remainder if self.running and self.running[-1]._at_end else None


class _ListBatchSampler(Sampler[list[int]]):
    """Yields precomputed batches of indices; the prepared loader refills it before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _batches_of(
    stream: Iterable[tuple[Any, int, bool, int | None]],
    places: collections.deque[tuple[int, bool, int | None]],
) -> Iterator[Any]:
    """The batches of ``stream``'s ``(batch, position, at_end, remainder)``; the rest queued in ``places``."""
    for batch, position, at_end, remainder in stream:
        places.append((position, at_end, remainder))
        yield batch


class PreparedDataLoader:
    """Returned by ``Accelerator.prepare`` for each ``DataLoader``. Iterate it like the original."""

    def __init__(
        self,
        dataloader: DataLoader[Any],
        *,
        device: torch.device | None,
        to_device: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
        world_size: int,
        rank: int,
        seed: int,
        even_batches: bool,
        loop_state: LoopState,
        split_batches: bool = False,
        shard_samples: bool = False,
        unrepeated: bool = False,
    ) -> None:
        if split_batches:
            check_splittable(dataloader, world_size)
        self.base_dataloader = dataloader
        self.device = device  # None: batches stay where the dataloader makes them (device_placement)
        # Moves a pass's batches to the device (the strategy's: XLA prefetches and shards).
        self._to_device = to_device or (
            (lambda batches: batches) if device is None else (lambda batches: move_batches(batches, device))
        )
        self.world_size = world_size
        self.rank = rank
        self.even_batches = even_batches
        self.split_batches = split_batches
        self._loop_state = loop_state
        self._seed = seed
        self._next_epoch = 0
        self._epoch = 0
        self._position = 0
        self._in_pass = False
        self._resume_position = 0
        self._at_end = False
        self._remainder: int | None = None
        self._plan: list[list[int]] = []  # this rank's batches of the running pass (batch_indices)
        self._generator = torch.Generator()
        self._iterable = isinstance(dataloader.dataset, IterableDataset)
        # Deal samples, as Lightning's DistributedSampler (the Trainer's evaluation loaders) or, for
        # ``unrepeated``, its UnrepeatedDistributedSampler (predict); a custom batch sampler then
        # batches each rank's share, as Lightning's does, where it has a ``sampler`` to replace.
        self._custom_batches = dataloader.batch_size is None and dataloader.batch_sampler is not None
        self._deal_samples = (
            (shard_samples or unrepeated)
            and not (split_batches or self._iterable)
            and (not self._custom_batches or takes_a_sampler(dataloader.batch_sampler))
        )
        self._unrepeated = unrepeated
        self._own_batches = 0  # of a dealt plan: the rest repeat batches to even out the steps
        self._drop_last = bool(dataloader.drop_last)
        self._batch_sampler = _ListBatchSampler()
        self._seeded_workers = dataloader.num_workers > 0 and not self._iterable
        self._loader = self._rebuild(dataloader)

    def _rebuild(self, dl: DataLoader[Any]) -> DataLoader[Any]:
        """The user's loader with our batch sampler and generator, every other setting kept.

        Our generator also replaces the global RNG draw a DataLoader iterator takes for its worker
        seeds, so iterating never advances the user's random stream.
        """
        kwargs = settings(dl, self._generator)
        if self._iterable:  # split: a global batch is read as world_size consecutive slices
            batch_size = (
                dl.batch_size // self.world_size if self.split_batches and dl.batch_size else dl.batch_size
            )
            return DataLoader(dl.dataset, batch_size=batch_size, drop_last=dl.drop_last, **kwargs)
        dataset = SeededFetch(dl.dataset) if self._seeded_workers else dl.dataset
        if dl.batch_sampler is None:  # batch_size=None: each "batch" of the plan is one sample, as is
            kwargs["collate_fn"] = OneSample(dl.collate_fn)
        return DataLoader(dataset, batch_sampler=self._batch_sampler, **kwargs)

    # -- the epoch plan ---------------------------------------------------------------------------
    def _global_batches(self, epoch: int) -> list[list[int]]:
        dl = self.base_dataloader
        generator = torch.Generator().manual_seed(self._seed + epoch)
        if self._deal_samples:  # the sampler's order, one sample a "batch"
            return [[index] for index in with_generator(dl.sampler, generator)]
        if dl.batch_sampler is not None:
            return [list(batch) for batch in with_generator(dl.batch_sampler, generator)]
        # batch_size=None: the sampler yields single indices and the loader does not batch.
        return [[index] for index in with_generator(dl.sampler, generator)]

    def _rank_plan(self, epoch: int) -> tuple[list[list[int]], int | None]:
        """This rank's batches for ``epoch`` and the number of real samples in the last global step."""
        if self._deal_samples:  # (padded: the repeated samples, at most world - 1, are not cut: as Lightning)
            order = [index for (index,) in self._global_batches(epoch)]
            if not self._unrepeated:
                plan = self._dealt(order, self.rank, epoch)
                self._own_batches = len(plan)
                return plan, None
            plans = [self._dealt(order, rank, epoch) for rank in range(self.world_size)]
            self._own_batches = len(plans[self.rank])
            return even_out(plans, self.rank)
        return rank_plan(
            self._global_batches(epoch), self.world_size, self.rank, even_batches=self.even_batches,
            drop_last=self._drop_last, split_batches=self.split_batches, batch_size=self.base_dataloader.batch_size,
        )  # fmt: skip

    def _dealt(self, order: list[int], rank: int, epoch: int) -> list[list[int]]:
        """``rank``'s share of the samples in ``order``, in the loader's batches or its batch sampler's."""
        dl, share = self.base_dataloader, deal(order, self.world_size, rank, padded=not self._unrepeated)
        if not self._custom_batches:
            return batch_share(share, dl.batch_size, drop_last=self._drop_last)
        batch_sampler = with_generator(dl.batch_sampler, torch.Generator().manual_seed(self._seed + epoch))
        return [list(batch) for batch in rebatched(batch_sampler, share)]

    @property
    def total_batch_size(self) -> int | None:
        """Samples per step over all processes (🤗 Accelerate's): the loader's ``batch_size`` (or its
        batch sampler's, where it has one), times the processes unless batches are split among them;
        None when neither has one."""
        size = self.base_dataloader.batch_size
        if size is None:
            size = getattr(self.base_dataloader.batch_sampler, "batch_size", None)
            if not isinstance(size, int) or isinstance(size, bool):
                return None
        return size if self.split_batches else size * self.world_size

    def __len__(self) -> int:
        """The steps this rank runs in a pass; a TypeError, as from ``DataLoader``, when the
        dataset has no length. An iterable dataset is counted as its batches are dealt."""
        dl = self.base_dataloader
        if self._deal_samples and self._custom_batches:  # (the batch sampler's count, of each share)
            return len(self._plan if self._in_pass else self._rank_plan(self._next_epoch)[0])
        if self._deal_samples:  # (unrepeated: the first rank's, which the others even out to)
            size, samples = dl.batch_size, len(dl.sampler)  # type: ignore[arg-type]
            return sample_length(samples, self.world_size, batch_size=size, drop_last=self._drop_last)
        if self.split_batches:  # one step per global batch
            if dl.batch_size is None:  # a batch sampler's batches: a short last one may leave a rank out
                if self.even_batches:
                    return len(dl)
                return len(self._plan if self._in_pass else self._rank_plan(self._next_epoch)[0])
            samples = len(dl.dataset if self._iterable else dl.sampler)  # type: ignore[arg-type]
            return split_length(samples, dl.batch_size, self.world_size, self.rank,
                                even_batches=self.even_batches, drop_last=self._drop_last)  # fmt: skip
        total = len(dl)
        if self._drop_last:
            return total // self.world_size
        if self.even_batches:
            return math.ceil(total / self.world_size)
        return len(range(self.rank, total, self.world_size))

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        epoch, start = self._next_epoch, self._resume_position
        self._next_epoch, self._resume_position = epoch + 1, 0
        self._epoch, self._position, self._in_pass = epoch, start, True
        self._at_end, self._remainder = False, None
        running = self._loop_state.running
        running.append(self)
        self._generator.manual_seed(self._seed + epoch)  # worker seeds: a function of (seed, epoch)
        tell_epoch(self.base_dataloader, epoch)  # before the plan: a sampler may shuffle by its epoch
        try:
            if self._iterable:
                # The transfer sees batches only; each batch's place in the stream waits in a queue
                # (the plan runs ahead of what is yielded when the transfer prefetches).
                queued: collections.deque[tuple[int, bool, int | None]] = collections.deque()
                for batch in self._to_device(_batches_of(self._iterate_stream(start), queued)):
                    position, at_end, remainder = queued.popleft()
                    self._position = position
                    if at_end:
                        self._at_end, self._remainder = True, remainder
                    yield batch
            else:
                batches, remainder = self._rank_plan(epoch)
                self._plan = batches
                if self._seeded_workers:  # each batch carries its place, for the worker's seeds
                    places = ((self._seed, epoch, self.rank, i) for i in range(start, len(batches)))
                    self._batch_sampler.batches = [
                        PlannedBatch(b, p) for b, p in zip(batches[start:], places, strict=True)
                    ]
                else:
                    self._batch_sampler.batches = batches[start:]
                count = len(batches)
                for batch in self._to_device(self._loader):
                    self._position += 1
                    if self._position == count:
                        self._at_end, self._remainder = True, remainder
                    yield batch
        finally:
            self._in_pass, self._at_end, self._remainder = False, False, None
            if self in running:
                running.remove(self)

    def _iterate_stream(self, start: int) -> Iterator[tuple[Any, int, bool, int | None]]:
        """Iterable datasets: every rank reads the stream; round ``s`` gives batch ``s * world + rank``.

        Yields ``(batch, position, at_end, remainder)``. One round is read ahead so the last round is
        known while it is yielded (gradient sync and ``gather_for_metrics`` need that).
        """
        world = self.world_size
        stream = iter(self._loader)
        rounds = iter(lambda: list(itertools.islice(stream, world)), [])
        first_round = current = next(rounds, None)
        index = 0
        while current is not None:
            upcoming = next(rounds, None)
            # Only the last round can be short. When this rank takes nothing from it, the round
            # before is this rank's last (end_of_dataloader must be seen on a yielded batch).
            if index >= start and self._takes_from(current):
                group, remainder = current, None
                if len(group) < world:
                    remainder = sum(_batch_len(b) for b in group)
                    if self.rank >= len(group):  # even batches: repeat batches of the first round
                        assert first_round is not None
                        group = group + list(
                            itertools.islice(itertools.cycle(first_round), world - len(group))
                        )
                at_end = upcoming is None or not self._takes_from(upcoming)
                yield group[self.rank], index + 1, at_end, remainder
            current, index = upcoming, index + 1

    def _takes_from(self, group: list[Any]) -> bool:
        """Whether this rank loads a batch of round ``group`` of an iterable dataset."""
        if len(group) == self.world_size:
            return True
        return not self._drop_last and (self.even_batches or self.rank < len(group))

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (its shuffle order is a function of seed and epoch)."""
        self._next_epoch = epoch
        self._resume_position = 0

    @property
    def epoch(self) -> int:
        """The epoch of the running pass, or of the next one when no pass is running."""
        return self._epoch if self._in_pass else self._next_epoch

    @property
    def position(self) -> int:
        """Batches yielded so far in the running pass (0 between passes)."""
        return self._position if self._in_pass else self._resume_position

    @property
    def batch_indices(self) -> list[int] | None:
        """The dataset indices of the samples of the batch the running pass yielded last, as the
        sampler produced them and sharding gave them to this rank (repeated samples included, with
        even batches); None for an iterable dataset, or before a pass's first batch."""
        if self._iterable or not self._in_pass or self._position == 0:
            return None
        return list(self._plan[self._position - 1])

    @property
    def _own_samples(self) -> int | None:
        """How many leading samples of the batch yielded last are the epoch's own, the rest repeats
        that even out the last step (a prediction writer drops them); None: all of them."""
        if self._deal_samples:  # only whole batches past this rank's own repeat
            return 0 if self._in_pass and self._position > self._own_batches else None
        if not self._at_end or self._remainder is None:
            return None
        dl, world = self.base_dataloader, self.world_size
        if not (self._iterable or self.split_batches):  # whole batches, len(dl) of them globally
            last, leftover, step = len(self._plan[-1]), len(dl) % world, 0
        elif dl.batch_size is None and self._iterable:  # single samples of a stream: not counted
            return None
        else:  # (split_batches with a batch sampler: the size of its first batch)
            size = dl.batch_size or len(self._plan[0]) * world
            step = math.ceil(size / world) if self.split_batches else size
            last, leftover = (step if self._iterable else len(self._plan[-1])), None
        return own_samples(last, self._remainder, world, self.rank, leftover=leftover, step=step)

    @property
    def _gathered_order(self) -> list[int] | None:
        """For the step yielded last by a loader that deals its samples unpadded into its own batches:
        the permutation that puts what ``gather_for_metrics`` joined (each rank's batch, in rank
        order) in the sampler's order; None where nothing moves, or where no such order exists."""
        dl = self.base_dataloader
        if not (self._unrepeated and self._deal_samples and self._in_pass) or dl.batch_size is None:
            return None
        if self.world_size == 1 or self._custom_batches or self._position == 0:
            return None
        samples = len(dl.sampler)  # type: ignore[arg-type]
        positions = gathered_positions(
            samples, self.world_size, self._position - 1, batch_size=dl.batch_size, drop_last=self._drop_last
        )
        order = sorted(range(len(positions)), key=positions.__getitem__)
        return None if order == list(range(len(order))) else order

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"seed": self._seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._seed = int(state["seed"])
        self._next_epoch = int(state["epoch"])
        self._resume_position = int(state["position"])

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, num_workers, ... of the original
        if name.startswith("_") or name == "base_dataloader":
            raise AttributeError(name)
        return getattr(self.base_dataloader, name)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    return len(batch) if isinstance(batch, Sized) else 1
