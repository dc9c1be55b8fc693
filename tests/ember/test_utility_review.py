"""The Accelerator's utility API against 🤗 Accelerate's: the accumulation counter ``step`` (kept by
checkpoints), ``split_between_processes`` padding, and a ``broadcast`` whose shapes differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader

from ember import Accelerator, _ops


def _accumulating(
    steps: int,
) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer, DataLoader[torch.Tensor]]:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model = nn.Linear(2, 1)
    loader = DataLoader(torch.ones(8, 2), batch_size=1)
    prepared = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    return (accelerator, *prepared)


def test_step_counts_micro_steps_and_a_checkpoint_keeps_it(tmp_path: Path) -> None:
    # As Accelerate's `accelerator.step`: accumulate() counts, save_state keeps the count and
    # load_state restores it, so a run resumed mid-accumulation steps on the same batches.
    accelerator, model, optimizer, loader = _accumulating(4)
    syncs = []
    for i, x in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(model(x).sum())
            optimizer.step()
            optimizer.zero_grad()
        syncs.append(accelerator.sync_gradients)
        if i == 1:
            assert accelerator.step == 2
            with pytest.warns(UserWarning, match="middle of a gradient accumulation window"):
                accelerator.save_state(tmp_path / "ckpt")  # (its two micro-steps' gradients are not saved)
            break

    resumed, model2, _, loader2 = _accumulating(4)
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.step == 2
    for x in loader2:  # the loader resumes after the two batches run
        with resumed.accumulate(model2):
            resumed.backward(model2(x).sum())
        syncs.append(resumed.sync_gradients)
    assert syncs == [False, False, False, True, False, False, False, True]

    resumed.step = 1  # settable, as Accelerate's attribute
    with resumed.accumulate(model2):
        pass
    assert resumed.step == 2 and not resumed.sync_gradients
    with pytest.raises(ValueError, match=r"step=-1"):
        resumed.step = -1


def test_split_between_processes_pads_with_the_last_element_of_the_input() -> None:
    # Accelerate repeats the input's last element (4 items over 3 processes: [0, 1], [2, 3], [3, 3]).
    assert [_ops.split(list(range(4)), 3, rank, True) for rank in range(3)] == [[0, 1], [2, 3], [3, 3]]
    shares = [_ops.split(torch.arange(8).reshape(4, 2), 3, rank, True).tolist() for rank in range(3)]
    assert shares == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[6, 7], [6, 7]]]
    assert _ops.split((0, 1, 2, 3), 3, 1, True) == (2, 3)
    assert _ops.split(list(range(4)), 3, 1, False) == [2]


def _broadcast_worker() -> dict[str, str]:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    same = accelerator.broadcast({"a": torch.full((2,), float(rank))}, from_process=1)["a"].tolist()
    try:
        accelerator.broadcast({"a": torch.zeros(3 if rank == 0 else 2)})
    except ValueError as error:
        return {"same": str(same), "error": str(error)}
    return {"same": str(same), "error": ""}


def test_broadcast_of_different_shapes_is_a_clear_error_on_every_process() -> None:
    # gloo aborts both processes ("Received data size doesn't match expected size"), NCCL may hang.
    for result in run_processes(_broadcast_worker, nprocs=2):
        assert result["same"] == "[1.0, 1.0]"
        assert "broadcast()" in result["error"] and "process 0: [3]" in result["error"]
        assert "process 1: [2]" in result["error"]


def test_even_batches_is_settable_for_the_dataloaders_prepared_after() -> None:
    # Accelerate's setter: loaders prepared afterwards (and join_uneven_inputs' default) take it.
    accelerator = Accelerator(cpu=True)
    before = accelerator.prepare(DataLoader(torch.ones(3, 1), batch_size=2))
    accelerator.even_batches = False
    after = accelerator.prepare(DataLoader(torch.ones(3, 1), batch_size=2))
    assert accelerator.even_batches is False and accelerator.dataloader_config.even_batches is False
    assert before.even_batches is True and after.even_batches is False
    with pytest.raises(TypeError, match=r"even_batches"):
        accelerator.even_batches = "no"  # type: ignore[assignment]


def test_on_process_takes_the_process_index_by_position_too() -> None:
    accelerator = Accelerator(cpu=True)

    def where() -> str:
        return "here"

    assert accelerator.on_process(where, 0)() == "here"
    assert accelerator.on_local_process(where, 0)() == "here"
    assert accelerator.on_process(process_index=0)(where)() == "here"
    with pytest.raises(ValueError, match=r"process_index=None"):
        accelerator.on_process(where)


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def test_free_memory_keeps_registered_objects(tmp_path: Path) -> None:
    # Accelerate's free_memory forgets the prepared objects only: what register_for_checkpointing
    # was given (before a find_executable_batch_size retry loop) is still saved and loaded.
    accelerator = Accelerator(cpu=True)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    accelerator.prepare(nn.Linear(2, 2))
    accelerator.free_memory()
    accelerator.prepare(nn.Linear(2, 2))
    counter.n = 5
    accelerator.save_state(tmp_path / "ckpt")
    counter.n = 0
    accelerator.load_state(tmp_path / "ckpt")
    assert counter.n == 5 and (tmp_path / "ckpt" / "custom_checkpoint_0.json").exists()


def test_reduce_and_broadcast_refuse_what_is_not_a_tensor() -> None:
    # A float came back as it was, unreduced / not broadcast: each process kept its own value
    # (Accelerate raises TypeError, on one process too).
    accelerator = Accelerator(cpu=True)
    with pytest.raises(TypeError, match=r"reduce\(\) takes tensors .* got a float"):
        accelerator.reduce({"loss": torch.ones(1), "count": 3.0})
    with pytest.raises(TypeError, match=r"broadcast\(\) takes tensors .* got a str.*broadcast_object"):
        accelerator.broadcast(["run-1"])
    assert accelerator.reduce({"loss": torch.ones(1), "none": None}, "mean")["loss"].tolist() == [1.0]


class _Rows:
    """The part of a 🤗 datasets.Dataset that split_between_processes meets: a slice gives a dict of
    columns, select(indices) gives a Dataset of those rows."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> dict[str, list[int]]:
        return {"x": self.rows[index]}

    def select(self, indices: list[int]) -> _Rows:
        return _Rows([self.rows[i] for i in indices])


def test_split_between_processes_selects_the_rows_of_a_dataset() -> None:
    # Accelerate shares a datasets.Dataset with select(); slicing it gave a dict of columns instead.
    shares = [_ops.split(_Rows([10, 11, 12, 13]), 3, rank, True) for rank in range(3)]
    assert [type(s).__name__ for s in shares] == ["_Rows"] * 3
    assert [s.rows for s in shares] == [[10, 11], [12, 13], [13, 13]]
    assert _ops.split(_Rows([10, 11]), 3, 2, False).rows == []
