"""Collectives over nested structures of tensors, built on the strategy's four primitives."""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch

from ember._tree import apply_to_tensors
from ember.strategies import Strategy
from ember.strategies.base import ReduceOp


def _as_batch(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(0) if tensor.dim() == 0 else tensor


# A shape travels in this many slots (dims past the last slot are folded into it), so every rank
# sends a header of one size: ndim, dtype, shape.
_SLOTS = 16


@functools.cache
def _dtypes() -> list[torch.dtype]:
    """torch's dtypes in an order every process agrees on (a dtype travels as its index here)."""
    return sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def exchange_shapes(
    tensor: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor], caller: str, rows: bool = False
) -> list[int]:
    """Every rank's size along dim 0, in rank order, from one small all-gather of each rank's dtype
    and shape. Raises ``ValueError`` on every rank alike, naming each rank's shape, when the dtypes
    or shapes differ (``rows``: shapes may differ along dim 0): the data's collective would abort in
    gloo or fill the output with garbage."""
    shape = list(tensor.shape)
    if len(shape) > _SLOTS:
        shape = [*shape[: _SLOTS - 1], math.prod(shape[_SLOTS - 1 :])]
    dtypes = _dtypes()
    header = [tensor.dim(), dtypes.index(tensor.dtype), *shape, *[-1] * (_SLOTS - len(shape))]
    headers = all_gather(torch.tensor(header, dtype=torch.int64, device=tensor.device)).tolist()
    if any(h[:2] != headers[0][:2] or h[2 + rows :] != headers[0][2 + rows :] for h in headers):
        found = ", ".join(
            f"process {rank}: [{', '.join(str(n) for n in h[2 : 2 + min(h[0], _SLOTS)])}"
            f"{', ...' if h[0] > _SLOTS else ''}] {dtypes[h[1]]}"
            for rank, h in enumerate(headers)
        )
        same = (
            "the same dtype and the same size in every dimension but the first"
            if rows
            else "the same shape and dtype"
        )
        raise ValueError(
            f"{caller}: tensors must have {same} on every process; got {found}. Make them agree first: "
            "accelerator.pad_across_processes(tensor, dim=d) pads dimension d to its longest, tensor.to(dtype) casts"
        )
    return [h[2] for h in headers]


def gather_tensor(strategy: Strategy, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order.

    Ranks may hold different lengths along dim 0 (the last batch of an epoch): the sizes are
    exchanged first, tensors padded to the longest and the padding removed after the gather. The
    same exchange checks that the other dimensions and the dtype agree (else ``ValueError``). A
    0-dim tensor counts as one row (``[world_size]`` gathered); on one process every tensor comes
    back as it is, 0-dim included (🤗 Accelerate's shapes).
    """
    if strategy.world_size == 1:
        return tensor
    tensor = _as_batch(tensor)
    sizes = exchange_shapes(tensor, strategy.all_gather, "gather()", rows=True)
    longest = max(sizes)
    if longest != tensor.shape[0]:
        tensor = pad_tensor(tensor, longest, dim=0)
    stacked = strategy.all_gather(tensor)
    return torch.cat([stacked[rank, :size] for rank, size in enumerate(sizes)])


def gather(strategy: Strategy, data: Any) -> Any:
    return apply_to_tensors(data, lambda t: gather_tensor(strategy, t))


def gather_objects(strategy: Strategy, obj: Any, caller: str) -> list[Any]:
    """Every rank's ``obj`` in rank order, pickle-free: each travels as UTF-8 JSON in a byte tensor
    (strings, numbers, booleans, None, and lists and dicts of them)."""
    try:
        text = json.dumps(obj)
    except TypeError as error:
        raise TypeError(
            f"{caller}: {error}. Objects other than tensors travel between processes as JSON (strings, numbers, "
            "booleans, None, lists and dicts of them; no pickle): convert the rest first (a tensor: gather it "
            "on its own; numpy: .tolist())"
        ) from None
    if strategy.world_size == 1:
        return [json.loads(text)]
    device = strategy.root_device
    payload = json_bytes(text, device)
    sizes = strategy.all_gather(torch.tensor([payload.numel()], device=device)).flatten().tolist()
    stacked = strategy.all_gather(pad_tensor(payload, max(sizes), dim=0))
    return [from_json_bytes(stacked[rank, :size]) for rank, size in enumerate(sizes)]


def json_bytes(text: str, device: torch.device) -> torch.Tensor:
    """JSON ``text`` as a uint8 tensor on ``device``, to send between processes without pickle."""
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(device)


def from_json_bytes(data: torch.Tensor) -> Any:
    """The object :func:`json_bytes` encoded."""
    return json.loads(bytes(data.cpu().tolist()).decode())


def reduce(strategy: Strategy, data: Any, op: ReduceOp) -> Any:
    return apply_to_tensors(data, lambda t: strategy.all_reduce(t, op))


def broadcast(strategy: Strategy, data: Any, src: int) -> Any:
    return apply_to_tensors(data, lambda t: strategy.broadcast(t, src))


def check_same_tensors(strategy: Strategy, data: Any, caller: str) -> None:
    """Raise ``ValueError`` on every process alike, naming each process's tensors, unless the tensors
    of ``data`` have the same shapes and dtypes on every process: a collective on tensors of other
    sizes aborts the processes in gloo (and may hang in NCCL). One small all-gather of a digest; the
    shapes themselves travel only when the digests differ."""
    tensors: list[torch.Tensor] = []
    apply_to_tensors(data, tensors.append)
    dtypes = _dtypes()
    digest = zlib.crc32(json.dumps([[dtypes.index(t.dtype), *t.shape] for t in tensors]).encode())
    sent = torch.tensor([digest], dtype=torch.int64, device=strategy.root_device)
    if len(set(strategy.all_gather(sent).flatten().tolist())) == 1:
        return
    described = [f"[{', '.join(map(str, t.shape))}] {t.dtype}" for t in tensors]
    found = "; ".join(
        f"process {rank}: {', '.join(each) or 'no tensors'}"
        for rank, each in enumerate(gather_objects(strategy, described, caller))
    )
    raise ValueError(
        f"{caller}: the tensors must have the same shapes and dtypes on every process; got {found}. "
        "accelerator.pad_across_processes(tensor, dim=d) pads dimension d to its longest"
    )


def pad_tensor(
    tensor: torch.Tensor, size: int, dim: int = 0, pad_index: Any = 0, pad_first: bool = False
) -> torch.Tensor:
    if tensor.shape[dim] >= size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    padding = tensor.new_full(shape, pad_index)
    return torch.cat([padding, tensor] if pad_first else [tensor, padding], dim=dim)


def pad_across_processes(strategy: Strategy, data: Any, dim: int, pad_index: Any, pad_first: bool) -> Any:
    def pad(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0 or dim >= tensor.dim() or dim < -tensor.dim():
            return tensor
        local = torch.tensor([tensor.shape[dim]], device=tensor.device)
        longest = int(strategy.all_gather(local).max().item())
        return pad_tensor(tensor, longest, dim=dim, pad_index=pad_index, pad_first=pad_first)

    return apply_to_tensors(data, pad)


def truncate(data: Any, length: int) -> Any:
    """The first ``length`` rows of each tensor (a 0-dim tensor has no rows: it stays as it is)."""
    return apply_to_tensors(data, lambda t: t[:length] if t.dim() else t)


def split(inputs: Any, world_size: int, rank: int, apply_padding: bool) -> Any:
    """Rank ``rank``'s contiguous share of ``inputs``; the first ``len % world_size`` ranks get one more.

    With ``apply_padding`` every share has the same length, the short ones repeating the last element of
    ``inputs`` (as 🤗 Accelerate's). A 🤗 ``datasets.Dataset`` (anything else with ``select``) shares its
    rows through ``select``: a slice of it would be a dict of columns.
    """
    if isinstance(inputs, dict):
        _common_length(inputs)  # split apart, values of different lengths would no longer line up
        return {key: split(value, world_size, rank, apply_padding) for key, value in inputs.items()}
    length = len(inputs)
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    end = start + base + (1 if rank < extra else 0)
    if not isinstance(inputs, (list, tuple, torch.Tensor)) and callable(getattr(inputs, "select", None)):
        padded = apply_padding and extra and rank >= extra and length
        return inputs.select([*range(start, end), *([length - 1] if padded else [])])
    share = inputs[start:end]
    if apply_padding and extra and rank >= extra and length:
        share = torch.cat([share, inputs[-1:]]) if isinstance(share, torch.Tensor) else share + inputs[-1:]
    return share


def _common_length(inputs: dict[Any, Any], path: str = "inputs") -> int | None:
    """The length every value of ``inputs`` (nested dicts too) has, else ``ValueError`` naming two."""
    lengths: dict[str, int] = {}
    for key, value in inputs.items():
        name = f"{path}[{key!r}]"
        length = _common_length(value, name) if isinstance(value, dict) else len(value)
        if length is not None:
            lengths[name] = length
    if len(set(lengths.values())) > 1:
        short = min(lengths, key=lengths.__getitem__)
        long = max(lengths, key=lengths.__getitem__)
        raise ValueError(
            f"split_between_processes(): every value of a dict must have the same length, but {short} has "
            f"{lengths[short]} elements and {long} has {lengths[long]}"
        )
    return next(iter(lengths.values()), None)
