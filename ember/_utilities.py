"""🤗 Accelerate's loop helpers from ``accelerate.utils`` as plain functions (imported from ``ember``):
``send_to_device``, and ``wait_for_everyone``, ``gather_object`` and ``broadcast_object_list``, which
act on the processes of the run (:class:`~ember.PartialState`, set up as a ``PartialState()`` call
would if no Accelerator exists yet).

Example::

    from ember import broadcast_object_list, send_to_device

    batch = send_to_device(batch, accelerator.device, skip_keys="text")
    paths = broadcast_object_list([str(run_dir)])  # rank 0's, on every process
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ember._validation import check_bool, check_int, show

__all__ = ["broadcast_object_list", "gather_object", "send_to_device", "wait_for_everyone"]


def send_to_device(
    tensor: Any,
    device: torch.device | str | int,
    non_blocking: bool = False,
    skip_keys: str | Sequence[str] | None = None,
) -> Any:
    """Move every tensor (and any object with a ``.to`` method) in nested lists, tuples and
    mappings to ``device``; the containers keep their types and other values stay as they are.
    Entries of a mapping under one of ``skip_keys`` are left where they are."""
    check_bool("non_blocking", non_blocking, owner="send_to_device")
    if isinstance(skip_keys, str):
        skip: tuple[Any, ...] = (skip_keys,)
    elif skip_keys is None:
        skip = ()
    elif isinstance(skip_keys, (list, tuple)) and all(isinstance(key, str) for key in skip_keys):
        skip = tuple(skip_keys)
    else:
        raise TypeError(f"send_to_device(skip_keys={show(skip_keys)}) must be a str, a list of str or None")
    return _send(tensor, device, non_blocking, skip)


def _send(data: Any, device: torch.device | str | int, non_blocking: bool, skip: tuple[Any, ...]) -> Any:
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, (list, tuple)):
        items = [_send(item, device, non_blocking, skip) for item in data]
        if isinstance(data, tuple) and hasattr(data, "_fields"):  # a namedtuple takes its fields
            return type(data)(*items)
        return type(data)(items)
    if isinstance(data, Mapping):
        return type(data)(
            {
                key: value if key in skip else _send(value, device, non_blocking, skip)
                for key, value in data.items()
            }  # type: ignore[call-arg]
        )
    if callable(getattr(data, "to", None)):  # a module, a tokenizer's BatchEncoding ...
        try:
            return data.to(device, non_blocking=non_blocking)
        except TypeError:  # a .to() that takes no non_blocking
            return data.to(device)
    return data


def wait_for_everyone() -> None:
    """Wait until every process of the run reaches this call (a barrier)."""
    from ember.state import PartialState

    PartialState().wait_for_everyone()


def gather_object(object: Any) -> list[Any]:
    """Every process's ``object``, in process order, lists joined (``accelerator.gather_object``:
    JSON values, no pickle)."""
    from ember.state import PartialState

    return PartialState().gather_object(object)


def broadcast_object_list(object_list: list[Any], from_process: int = 0) -> list[Any]:
    """Replace the items of ``object_list`` with those of process ``from_process``, in place, and
    return it. The items travel as JSON (strings, numbers, booleans, None, lists and dicts of them;
    a tuple arrives as a list), not as pickles as in 🤗 Accelerate."""
    from ember.state import PartialState

    if not isinstance(object_list, list):
        raise TypeError(
            f"broadcast_object_list(object_list={show(object_list)}) must be a list (it is changed in place)"
        )
    state = PartialState()
    check_int(
        "from_process",
        from_process,
        minimum=0,
        maximum=state.num_processes - 1,
        owner="broadcast_object_list",
    )
    if state.num_processes > 1:
        object_list[:] = state.broadcast_object(object_list, from_process)
    return object_list
