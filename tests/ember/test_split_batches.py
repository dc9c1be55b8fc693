"""``DataLoaderConfiguration(split_batches=True)``: the loader's batch size is the global batch, each
process takes its slice of every batch. The plan is checked for every shape of epoch, the prepared
loader for each rank's samples, and 2 real processes for the optimizer steps of one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from ember import Accelerator, DataLoaderConfiguration
from ember._plan import rank_plan, split_length
from ember.data import LoopState, PreparedDataLoader


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    samples=st.integers(1, 60),
    world=st.integers(1, 4),
    slice_size=st.integers(1, 5),
    even=st.booleans(),
    drop_last=st.booleans(),
)
def test_each_step_is_one_global_batch_in_slices(
    samples: int, world: int, slice_size: int, even: bool, drop_last: bool
) -> None:
    size = world * slice_size
    batches = [list(b) for b in BatchSampler(SequentialSampler(range(samples)), size, drop_last)]
    plans = [
        rank_plan(
            batches, world, r, even_batches=even, drop_last=drop_last, split_batches=True, batch_size=size
        )
        for r in range(world)
    ]
    for rank, (mine, _) in enumerate(plans):
        expected = split_length(samples, size, world, rank, even_batches=even, drop_last=drop_last)
        assert len(mine) == expected
    remainders = {remainder for mine, remainder in plans if len(mine) == len(batches)}  # at the last step
    assert len(remainders) == 1
    (remainder,) = remainders
    for mine, early in plans:  # a rank that stops a step early ends on a full batch: nothing to cut
        assert len(mine) == len(batches) or early is None
    for step, batch in enumerate(batches):
        parts = [mine[step] for mine, _ in plans if step < len(mine)]
        joined = [index for part in parts for index in part]
        if len(batch) == size:  # a full batch: equal slices, in rank order
            assert joined == batch and {len(part) for part in parts} == {slice_size}
            continue
        assert remainder == len(batch) and joined[: len(batch)] == batch  # the real samples first
        if even:  # filled from the start of the epoch, so that every rank gets a full slice
            assert len(parts) == world and joined[len(batch) :] == [
                i % samples for i in range(size - len(batch))
            ]
        else:
            assert joined == batch
    if not batches or len(batches[-1]) == size:
        assert remainder is None


def _loader(data: Any, world: int, rank: int, even: bool = True, **kwargs: Any) -> PreparedDataLoader:
    return PreparedDataLoader(
        DataLoader(data, **kwargs), device=torch.device("cpu"), world_size=world, rank=rank, seed=0,
        even_batches=even, loop_state=LoopState(), split_batches=True,
    )  # fmt: skip


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(10))

    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize("iterable", [False, True])
def test_each_rank_loads_its_slice_and_the_last_batch_is_filled(iterable: bool) -> None:
    data = _Stream() if iterable else TensorDataset(torch.arange(10))
    per_rank = []
    for rank in range(2):
        loader = _loader(data, 2, rank, batch_size=4)
        batches = [(b if iterable else b[0]).tolist() for b in loader]
        per_rank.append(batches)
        assert len(loader) == len(batches) == 3
    assert per_rank == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [0, 1]]]
    uneven = []
    for rank in range(2):
        loader = _loader(data, 2, rank, even=False, batch_size=4)
        uneven.append([(b if iterable else b[0]).tolist() for b in loader])
        assert len(loader) == len(uneven[-1])  # the last rank runs one step less
    assert uneven == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7]]]


def test_bad_split_settings_are_refused() -> None:
    data = TensorDataset(torch.arange(10))
    with pytest.raises(
        ValueError, match=r"batch_size \(5\) to be a multiple of the number of processes \(2\)"
    ):
        _loader(data, 2, 0, batch_size=5)
    with pytest.raises(ValueError, match="split_batches=True needs a dataloader that makes batches"):
        _loader(data, 2, 0, batch_size=None)
    with pytest.raises(ValueError, match="pass even_batches either to the Accelerator"):
        Accelerator(even_batches=False, dataloader_config=DataLoaderConfiguration())
    with pytest.raises(
        TypeError, match="dataloader_config=.* must be an ember.DataLoaderConfiguration or None"
    ):
        Accelerator(dataloader_config={"split_batches": True})  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"dispatch_batches=True\) is not supported.*Valid choices: None, False"
    ):
        DataLoaderConfiguration(dispatch_batches=True)
    with pytest.raises(ValueError, match=r"DataLoaderConfiguration\(data_seed=-1\) must be an int >= 0"):
        DataLoaderConfiguration(data_seed=-1)


def test_one_process_keeps_whole_batches_and_data_seed_sets_the_order() -> None:
    data = TensorDataset(torch.arange(40))

    def order(**kwargs: Any) -> list[int]:
        loader = Accelerator(**kwargs).prepare(DataLoader(data, batch_size=8, shuffle=True))
        return [int(i) for (batch,) in loader for i in batch]

    config = DataLoaderConfiguration(split_batches=True, data_seed=5)
    assert order(seed=1, dataloader_config=config) == order(seed=2, dataloader_config=config)
    assert order(seed=1) != order(seed=2)
    assert order(seed=5) == order(seed=1, dataloader_config=config)  # data_seed is the loader's seed
    assert Accelerator(even_batches=False)._dataloader_config.even_batches is False


def _worker(root: str) -> dict:
    """Two processes on split global batches of 8 against one process on the same batches."""
    torch.manual_seed(0)
    x, y = torch.randn(44, 5), torch.randn(44, 1)
    data = TensorDataset(torch.arange(44), x, y)
    reference = torch.nn.Linear(5, 1)
    model = torch.nn.Linear(5, 1)
    model.load_state_dict(reference.state_dict())
    accelerator = Accelerator(
        strategy="ddp", dataloader_config=DataLoaderConfiguration(split_batches=True), seed=3
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # (a constant rate)
    model, optimizer, loader, schedule = accelerator.prepare(
        model, optimizer, DataLoader(data, batch_size=8, shuffle=True), schedule
    )
    seen = []
    for _, xb, yb in loader:  # 6 steps: the last global batch has 4 real samples
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    # The same global batches on one process (the last one filled as the prepared loader fills it).
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(6):
        rows = [idx for part in accelerator.gather_object([loader._plan[step]]) for idx in part]
        loss = torch.nn.functional.mse_loss(reference(x[rows[:4]]), y[rows[:4]]) / 2
        loss = loss + torch.nn.functional.mse_loss(reference(x[rows[4:]]), y[rows[4:]]) / 2
        loss.backward()
        plain.step()
        plain.zero_grad()
        seen.append(rows)
    evaluated = []
    for index, _, _ in accelerator.prepare(DataLoader(data, batch_size=8)):
        evaluated += accelerator.gather_for_metrics(index).tolist()
    unwrapped = accelerator.unwrap_model(model)
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(unwrapped.parameters(), reference.parameters(), strict=True)
    )
    return {"gap": gap, "seen": seen, "evaluated": evaluated, "len": len(loader),
            "scheduled": schedule.scheduler.last_epoch}  # fmt: skip


def test_two_processes_take_the_steps_of_one_on_the_global_batches(tmp_path: Path) -> None:
    results = run_processes(_worker, str(tmp_path), nprocs=2)
    for result in results:
        assert result["len"] == 6 and result["gap"] < 1e-6
        # One schedule step per step, as Accelerate's: the processes share the global batches (without
        # split_batches each process loads its own, and the schedule advances num_processes times).
        assert result["scheduled"] == 6
        assert result["evaluated"] == list(range(44))  # every sample once, in order; the fill dropped
    seen = results[0]["seen"]
    assert sorted(i for rows in seen[:5] for i in rows) == sorted(set(i for rows in seen[:5] for i in rows))
    assert len({i for rows in seen for i in rows}) == 44  # the epoch's samples, each in some step


def test_a_batch_sampler_short_last_batch_counts_the_steps_each_rank_runs() -> None:
    batch_sampler = BatchSampler(SequentialSampler(range(9)), 4, drop_last=False)  # 4, 4, 1
    data = TensorDataset(torch.arange(9))
    for even, lengths in ((True, [3, 3]), (False, [3, 2])):  # uneven: rank 1 gets nothing of the last
        for rank in range(2):
            loader = _loader(data, 2, rank, even=even, batch_sampler=batch_sampler)
            assert len(loader) == lengths[rank]
            assert len(list(loader)) == lengths[rank]


def _deepspeed_micro_batch_worker() -> int | None:
    # No engine is built: the dataloader alone sets the micro batch the engine would get.
    accelerator = Accelerator(
        strategy="deepspeed", dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    accelerator.prepare(DataLoader(TensorDataset(torch.arange(16)), batch_size=8))
    micro_batch: int | None = accelerator.strategy.micro_batch_size  # type: ignore[attr-defined]
    accelerator.end_training()
    return micro_batch


def test_deepspeed_micro_batch_is_each_processs_slice_of_a_split_batch() -> None:
    # As Accelerate: batch_size // num_processes (the engine's train_batch_size is then the global batch).
    assert run_processes(_deepspeed_micro_batch_worker, nprocs=2) == [4, 4]
