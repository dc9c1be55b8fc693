"""find_executable_batch_size (🤗 Accelerate's decorator), the out-of-memory test it uses, and the
Accelerator's trigger on one process (tests/ember/test_distributed.py has it on two)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from ember import Accelerator, find_executable_batch_size
from ember.memory import is_out_of_memory


def _fits_up_to(limit: int, tried: list[int]) -> Any:
    """A training function that runs out of memory above ``limit`` samples per batch."""

    def train(batch_size: int, scale: float = 1.0) -> float:
        tried.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_size * scale

    return train


def test_the_batch_size_shrinks_until_it_fits_and_is_kept() -> None:
    tried: list[int] = []
    train = find_executable_batch_size(_fits_up_to(50, tried), starting_batch_size=64)
    assert train(scale=2.0) == 90.0  # 64 -> 57 -> 51 -> 45: 0.9 times the last, as in Accelerate
    assert tried == [64, 57, 51, 45]
    assert train() == 45.0 and tried[-1] == 45  # the next call starts from the size that worked


def test_decorator_form_and_a_custom_reduction() -> None:
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=128, reduce_batch_size_fn=lambda: tried[-1] // 2)
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > 20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return batch_size

    assert train() == 16 and tried == [128, 64, 32, 16]


def test_other_errors_propagate_and_no_size_fits() -> None:
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=8)
    def broken(batch_size: int) -> None:
        tried.append(batch_size)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        broken()
    assert tried == [8]  # not retried
    never: list[int] = []
    with pytest.raises(RuntimeError, match=r"ran out of memory at every batch size from 4 down to 1"):
        find_executable_batch_size(_fits_up_to(0, never), starting_batch_size=4)()
    assert never == [4, 3, 2, 1]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"find_executable_batch_size\(starting_batch_size=0\) must be an int >= 1"
    ):
        find_executable_batch_size(starting_batch_size=0)
    with pytest.raises(
        TypeError, match=r"find_executable_batch_size\(starting_batch_size='8'\) must be an int >= 1"
    ):
        find_executable_batch_size(starting_batch_size="8")  # type: ignore[arg-type]
    train = find_executable_batch_size(_fits_up_to(10, []), starting_batch_size=4)
    with pytest.raises(TypeError, match=r"call it without the batch size, train\(scale\)"):
        train(4, 2.0)  # the batch size passed by hand as well
    stuck = find_executable_batch_size(
        _fits_up_to(1, []), starting_batch_size=4, reduce_batch_size_fn=lambda: 4
    )
    with pytest.raises(ValueError, match="reduce_batch_size_fn returned 4 after a batch size of 4"):
        stuck()


def test_a_failed_attempts_tensors_are_freed_before_the_next() -> None:
    alive: list[weakref.ref[torch.Tensor]] = []

    @find_executable_batch_size(starting_batch_size=4)
    def train(batch_size: int) -> int:
        activations = torch.ones(batch_size, 1000)
        if batch_size == 4:
            alive.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory.")
        assert alive[0]() is None  # the first attempt's tensor is gone when the second runs
        return batch_size

    gc.disable()  # freed by the decorator's own collection and the traceback's release, not by chance
    try:
        assert train() == 3
    finally:
        gc.enable()


def test_out_of_memory_messages() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear"))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error


def test_trigger_on_one_process() -> None:
    accelerator = Accelerator(cpu=True)
    assert not accelerator.check_trigger()
    accelerator.set_trigger()
    assert accelerator.check_trigger()
    assert not accelerator.check_trigger()  # the check lowered it
