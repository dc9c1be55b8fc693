"""Apply a function to every tensor in a nested structure of dicts, lists, tuples and dataclasses."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch


def apply_to_tensors(
    data: Any, fn: Callable[[torch.Tensor], Any], other: Callable[[Any], Any] | None = None
) -> Any:
    """Rebuild ``data`` with ``fn`` applied to each tensor; containers keep their type. ``other``, if
    given, is applied to every other leaf (neither a tensor nor a container)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    kind = type(data)
    if kind is list or kind is tuple:  # the usual batch, checked before the slower ABC lookups below
        return kind([apply_to_tensors(value, fn, other) for value in data])
    if kind is dict:
        return {key: apply_to_tensors(value, fn, other) for key, value in data.items()}
    if isinstance(data, Mapping):
        items = {key: apply_to_tensors(value, fn, other) for key, value in data.items()}
        try:
            return type(data)(items)  # type: ignore[call-arg]
        except TypeError:  # mappings whose constructor takes something else (e.g. defaultdict)
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(apply_to_tensors(value, fn, other) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_tensors(value, fn, other) for value in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: apply_to_tensors(getattr(data, f.name), fn, other)
            for f in dataclasses.fields(data)
            if f.init
        }
        return dataclasses.replace(data, **changes)
    return data if other is None else other(data)


def other_leaf(data: Any) -> Any:
    """The first leaf of ``data`` (through dicts, lists, tuples and dataclasses) that is neither a
    tensor nor None, as a one-element tuple; ``()`` when there is none."""
    found: list[Any] = []

    def visit(value: Any) -> None:
        if found or value is None or isinstance(value, torch.Tensor):
            return
        if isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name))
        else:
            found.append(value)

    visit(data)
    return tuple(found)


def move_batches(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Each of ``batches`` moved to ``device`` as it is asked for (a ``map``: no generator frame of
    ours resumed per batch, and a plain positional call per batch)."""
    return map(move_to_device, batches, itertools.repeat(device))


def move_to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor in ``data`` to ``device`` (non-blocking when the source is pinned memory),
    and, as Lightning's, every other object with a ``to`` method (a graph batch, a custom batch
    class): ``obj.to(device)``."""
    kind = type(data)
    if device.type == "cpu" and (kind is tuple or kind is list):  # CPU training: the batch is there
        for item in data:
            if type(item) is not torch.Tensor or not item.is_cpu:
                break
        else:
            return data  # as it is: no copy, no new container (this runs for every batch)

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == device:  # already there: no call into torch
            return tensor
        return tensor.to(device, non_blocking=tensor.is_pinned())

    def move_other(value: Any) -> Any:
        to = getattr(value, "to", None)
        return to(device) if callable(to) and not isinstance(value, type) else value

    return apply_to_tensors(data, move, move_other)
