"""Which of an epoch's batches a rank of a prepared dataloader loads: the epoch plan, as pure functions.

The user's batch sampler gives the epoch's global list of batches (lists of dataset indices). By
default rank ``r`` of ``world`` takes batch ``s * world + r`` at step ``s``. With ``split_batches``
each global batch is one step: rank ``r`` takes the ``r``-th of ``world`` equal slices of it.

Either way, with ``even_batches`` an incomplete last step is completed from the start of the epoch
so that every rank steps as often; the plan then reports how many of the last step's samples are
real (``remainder``), which ``gather_for_metrics`` keeps.

``own_samples`` says how many samples of a rank's batch in that evened-out last step are real, the
rest being the repeats (a prediction writer keeps each sample once, as Lightning's unrepeated
predict sampler gives it).

``sample_plan`` deals samples instead, as Lightning's ``DistributedSampler`` does (the Trainer's
validation and test loaders): rank ``r`` takes samples ``r``, ``r + world``, ... of the sampler's
order, padded from its start to a multiple of ``world``, and batches them itself. Unpadded (the
Trainer's predict loaders, as Lightning's ``UnrepeatedDistributedSampler``), ``even_out`` completes
the shorter plans with repeated batches that ``gather_for_metrics`` and the prediction writers drop.
"""

from __future__ import annotations

import itertools
import math

__all__ = [
    "batch_share",
    "deal",
    "even_out",
    "gathered_positions",
    "own_samples",
    "rank_plan",
    "sample_length",
    "sample_plan",
    "split_length",
]

Plan = tuple[list[list[int]], int | None]


def rank_plan(
    batches: list[list[int]],
    world: int,
    rank: int,
    *,
    even_batches: bool,
    drop_last: bool,
    split_batches: bool = False,
    batch_size: int | None = None,
) -> Plan:
    """Rank ``rank``'s batches of the epoch and the real samples of its last global step (None: this
    rank's last step holds no duplicate and no missing sample). ``batch_size``: the size of a full
    global batch under ``split_batches`` (None: the first batch's)."""
    if split_batches:
        return _split_plan(batches, world, rank, even_batches, batch_size)
    full_rounds, leftover = divmod(len(batches), world)
    mine = [batches[s * world + rank] for s in range(full_rounds)]
    if leftover == 0 or drop_last:
        return mine, None
    last_round = batches[full_rounds * world :]
    remainder = sum(len(b) for b in last_round)
    if rank < leftover:
        mine.append(last_round[rank])
    elif even_batches:  # duplicate batches from the start so every rank steps as often
        mine.append(batches[(rank - leftover) % len(batches)])
    else:  # this rank stops a step early: its last step is a full round, nothing of it is cut
        return mine, None
    return mine, remainder


def own_samples(last: int, remainder: int, world: int, rank: int, *, leftover: int | None, step: int) -> int:
    """How many leading samples of rank ``rank``'s ``last`` batch, in a last step that ``even_batches``
    completed, are the epoch's own (``remainder`` of the step's samples are; the rest repeat samples
    from the epoch's start). ``gather_for_metrics`` keeps the same ones: the first ``remainder`` in
    rank order.

    ``leftover``: whole batches were dealt and the last round held that many, so the ranks before it
    hold real batches and the others a repeated one. None: every rank before this one holds ``step``
    of the step's real samples (a slice of a split batch, or a full batch of a stream).
    """
    if leftover is not None:
        return last if rank < leftover else 0
    return max(0, min(last, remainder - rank * step))


def _split_plan(
    batches: list[list[int]], world: int, rank: int, even_batches: bool, batch_size: int | None
) -> Plan:
    if not batches:
        return [], None
    size = batch_size or len(batches[0])  # a full global batch
    slice_size = math.ceil(size / world)
    mine = []
    for number, batch in enumerate(batches[:-1]):
        if len(batch) < world:  # some rank would get an empty batch in the middle of the epoch
            raise ValueError(
                f"split_batches=True: batch {number} of the epoch has {len(batch)} samples, fewer than the "
                f"{world} processes it is split between"
            )
        mine.append(_slice(batch, world, rank))
    last = batches[-1]
    if len(last) >= size:
        mine.append(_slice(last, world, rank))
        return mine, None
    if even_batches:  # fill the last batch up to a full one from the start of the epoch, then split it
        start = itertools.cycle(itertools.chain.from_iterable(batches))
        filled = last + list(itertools.islice(start, size - len(last)))
        mine.append(_slice(filled, world, rank))
    else:  # the usual slice size: the last ranks may get a short slice or none
        part = last[rank * slice_size : (rank + 1) * slice_size]
        if not part:  # this rank stops a step early, at a full batch: nothing of it is cut
            return mine, None
        mine.append(part)
    return mine, len(last)


def _slice(batch: list[int], world: int, rank: int) -> list[int]:
    size = math.ceil(len(batch) / world)
    return batch[rank * size : (rank + 1) * size]


def split_length(
    samples: int, batch_size: int, world: int, rank: int, *, even_batches: bool, drop_last: bool
) -> int:
    """Steps of a pass over ``samples`` samples in global batches of ``batch_size``, split between ``world``."""
    full, rest = divmod(samples, batch_size)
    if rest == 0 or drop_last:
        return full
    if even_batches:
        return full + 1
    return full + (rest > rank * math.ceil(batch_size / world))


def sample_plan(
    order: list[int], world: int, rank: int, *, batch_size: int | None, drop_last: bool, padded: bool = True
) -> list[list[int]]:
    """Rank ``rank``'s batches when samples, not batches, are dealt (``batch_size=None``: one sample
    each). The padding repeats at most ``world - 1`` samples; ``drop_last`` drops this rank's short
    last batch."""
    return batch_share(deal(order, world, rank, padded=padded), batch_size, drop_last=drop_last)


def deal(order: list[int], world: int, rank: int, *, padded: bool) -> list[int]:
    """Rank ``rank``'s samples of ``order``: ``r``, ``r + world``, ... (``padded``: the last round
    completed from the start of ``order``, as ``DistributedSampler``; else as Lightning's
    ``UnrepeatedDistributedSampler``, the first ranks take one more)."""
    if order and padded:
        padding = -len(order) % world
        order = order + list(itertools.islice(itertools.cycle(order), padding))
    return order[rank::world]


def batch_share(mine: list[int], batch_size: int | None, *, drop_last: bool) -> list[list[int]]:
    """``mine`` in batches of ``batch_size`` (None: one sample each); ``drop_last``: a short last one dropped."""
    if batch_size is None:
        return [[index] for index in mine]
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def even_out(plans: list[list[list[int]]], rank: int) -> tuple[list[list[int]], int | None]:
    """Rank ``rank``'s batches of ``plans`` (every rank's), completed to the longest plan's length
    with batches that repeat one of its own (or rank 0's first, when it has none), and the real
    samples of the last step (None: no rank repeats a batch)."""
    steps = max((len(plan) for plan in plans), default=0)
    mine = list(plans[rank])
    if all(len(plan) == steps for plan in plans):
        return mine, None
    filler = mine[0] if mine else next(plan[0] for plan in plans if plan)
    mine += [filler] * (steps - len(mine))
    return mine, sum(len(plan[-1]) for plan in plans if len(plan) == steps)


def gathered_positions(samples: int, world: int, step: int, *, batch_size: int, drop_last: bool) -> list[int]:
    """Where in the sampler's order the samples of step ``step`` stand, when ``samples`` are dealt
    unpadded and each rank batches its own: every rank's batch in rank order, as ``gather`` joins
    them (a rank with no batch of its own at that step adds nothing: ``gather_for_metrics`` cuts it)."""
    positions: list[int] = []
    for rank in range(world):
        start = step * batch_size
        size = min(batch_size, len(range(rank, samples, world)) - start)
        if size > 0 and not (drop_last and size < batch_size):
            positions += [(start + j) * world + rank for j in range(size)]
    return positions


def sample_length(samples: int, world: int, *, batch_size: int | None, drop_last: bool) -> int:
    """The number of batches of every rank's ``sample_plan`` over ``samples`` samples."""
    mine = math.ceil(samples / world)
    if batch_size is None:
        return mine
    return mine // batch_size if drop_last else math.ceil(mine / batch_size)
