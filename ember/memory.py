"""Running out of device memory: recognising the error, and retrying with a smaller batch
(:func:`find_executable_batch_size`, 🤗 Accelerate's decorator of the same name)."""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ember._validation import check_int

__all__ = ["find_executable_batch_size", "is_out_of_memory", "release_memory"]

R = TypeVar("R")

# What the allocators of torch's devices say when an allocation fails (CUDA and ROCm, XPU, MPS, the
# CPU's default allocator), and cuDNN's error for a workspace it could not get.
_OUT_OF_MEMORY = (
    " out of memory",
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed device allocation, which a smaller batch may avoid."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if not isinstance(error, RuntimeError) or not error.args or not isinstance(error.args[0], str):
        return False
    return any(text in error.args[0] for text in _OUT_OF_MEMORY)


def release_memory(*objects: Any) -> list[None]:
    """Collect garbage and give the CUDA cache's unused blocks back (after an out-of-memory error
    the failed attempt's tensors are garbage once its frames are gone).

    Returns one ``None`` per object given, to rebind your names with, as 🤗 Accelerate's
    ``accelerate.utils.release_memory``::

        model, optimizer = release_memory(model, optimizer)
    """
    released: list[None] = [None] * len(objects)
    del objects  # the caller's references are the last ones once it rebinds them
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return released


def find_executable_batch_size(
    function: Callable[..., R] | None = None,
    *,
    starting_batch_size: int = 128,
    reduce_batch_size_fn: Callable[[], int] | None = None,
) -> Any:
    """Call ``function(batch_size, *args, **kwargs)``, retrying with a smaller batch size each time
    it runs out of memory (:func:`is_out_of_memory`); other errors propagate.

    The batch size starts at ``starting_batch_size`` and is multiplied by 0.9 after each failure
    (``reduce_batch_size_fn``: a function of no arguments that returns the next size instead), as
    in 🤗 Accelerate; at 0 a ``RuntimeError`` says no size worked. Between two attempts the
    failed one's memory is released (:func:`release_memory`). The size that worked is kept: a
    second call of the decorated function starts from it. Build the model, optimizer and loaders
    (and call ``accelerator.free_memory()`` then ``prepare``) inside ``function``: an attempt
    must start from scratch. With several processes every one must run out of memory at the same
    point, as they do when they train the same model on same-sized batches::

        @find_executable_batch_size(starting_batch_size=256)
        def train(batch_size: int, config: dict) -> None:
            accelerator.free_memory()
            loader = DataLoader(dataset, batch_size=batch_size)
            ...

        train(config)  # no batch size: the decorator passes it
    """
    check_int("starting_batch_size", starting_batch_size, minimum=1, owner="find_executable_batch_size")
    if function is None:
        return functools.partial(
            find_executable_batch_size,
            starting_batch_size=starting_batch_size,
            reduce_batch_size_fn=reduce_batch_size_fn,
        )
    batch_size = starting_batch_size

    def smaller() -> int:
        return int(batch_size * 0.9)

    reduce = reduce_batch_size_fn or smaller

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> R:
        nonlocal batch_size
        _check_not_given_batch_size(function, args)
        release_memory()
        while True:
            if batch_size < 1:
                raise RuntimeError(
                    f"find_executable_batch_size: {function.__name__} ran out of memory at every batch size "
                    f"from {starting_batch_size} down to 1"
                )
            try:
                return function(batch_size, *args, **kwargs)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
            # Out of the except block: the error's traceback, which holds the failed attempt's frames
            # and their tensors, is gone, so they can be freed.
            release_memory()
            tried, batch_size = batch_size, reduce()
            if batch_size >= tried:
                raise ValueError(
                    f"find_executable_batch_size: reduce_batch_size_fn returned {batch_size} after a batch size "
                    f"of {tried} ran out of memory; it must return a smaller one"
                )

    return run


def _check_not_given_batch_size(function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The decorator passes the batch size first: a caller passing it too shifts every argument."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return
    kinds = [p.kind for p in parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return
    positional = [
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) + 1 > len(positional):
        raise TypeError(
            f"{function.__name__}() was called with {len(args)} positional argument(s) and takes "
            f"{len(positional)} including the batch size, which find_executable_batch_size passes first: "
            f"call it without the batch size, {function.__name__}(" + ", ".join(positional[1:]) + ")"
        )
