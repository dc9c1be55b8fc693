"""Collectives over nested structures of tensors, built on the strategy's four primitives."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from ember._tree import apply_to_tensors
from ember.strategies import Strategy
from ember.strategies.base import ReduceOp


def _as_batch(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(0) if tensor.dim() == 0 else tensor


def tensors_of(data: Any) -> list[torch.Tensor]:
    """The tensors of a nested structure, in the order :func:`apply_to_tensors` visits them."""
    found: list[torch.Tensor] = []
    apply_to_tensors(data, found.append)
    return found


# Each process sends one header of this many int64 for a whole structure: how many tensors, a
# digest of their dtypes and shapes, and the dim-0 sizes of the first _HEADER - 2 (a structure of
# more sends its sizes in a second all-gather). A header of one size on every process is what lets
# a single collective compare structures that may differ.
_HEADER = 16


def check_shapes(
    tensors: list[torch.Tensor],
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    caller: str,
    rows: bool = False,
) -> list[list[int]]:
    """Check that ``tensors`` (a structure's, in order) have the same dtypes and shapes on every
    process, in one small all-gather for the whole structure; ``rows``: the sizes along dim 0 may
    differ (a 0-dim tensor counts as one row), and are returned, per tensor, each process's in
    process order (else ``[]``).

    Otherwise raises ``ValueError`` on every process alike, naming each process's tensors: a
    collective on tensors of other sizes or dtypes aborts the processes in gloo (may hang in NCCL),
    or fills the result with other bytes. Only then do the shapes themselves travel.
    """
    batched = [_as_batch(t) for t in tensors] if rows else tensors
    text = json.dumps([[str(t.dtype), *t.shape[1 if rows else 0 :]] for t in batched])
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
    count, slots = len(batched), _HEADER - 2
    sizes = [t.shape[0] for t in batched[:slots]] if rows else []
    header = torch.tensor([count, digest, *sizes, *[0] * (slots - len(sizes))], dtype=torch.int64)
    headers = all_gather(header.to(device)).tolist()
    if any(h[:2] != headers[0][:2] for h in headers):
        _raise_mismatch(tensors, all_gather, device, caller, rows)
    if not rows:
        return []
    if count <= slots:
        table = [h[2 : 2 + count] for h in headers]
    else:  # the same count on every process (checked above): one more all-gather of equal size
        table = all_gather(torch.tensor([t.shape[0] for t in batched], device=device)).tolist()
    return [[each[i] for each in table] for i in range(count)]


def _raise_mismatch(
    tensors: list[torch.Tensor],
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    caller: str,
    rows: bool,
) -> None:
    described = [f"[{', '.join(map(str, t.shape))}] {t.dtype}" for t in tensors]
    found = "; ".join(
        f"process {rank}: {', '.join(each) or 'no tensors'}"
        for rank, each in enumerate(_gather_json(described, all_gather, device))
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


def gather(strategy: Strategy, data: Any) -> Any:
    """Concatenate each tensor of ``data`` from all ranks along dim 0, in rank order.

    Ranks may hold different lengths along dim 0 (the last batch of an epoch): the sizes of the
    whole structure are exchanged first (:func:`check_shapes`, which also checks that the other
    dimensions and the dtypes agree), tensors padded to the longest and the padding removed after
    the gather. A 0-dim tensor counts as one row (``[world_size]`` gathered); on one process every
    tensor comes back as it is, 0-dim included (🤗 Accelerate's shapes).
    """
    if strategy.world_size == 1:
        return data
    rows = iter(
        check_shapes(tensors_of(data), strategy.all_gather, strategy.root_device, "gather()", rows=True)
    )

    def gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
        tensor, sizes = _as_batch(tensor), next(rows)
        longest = max(sizes)
        if longest != tensor.shape[0]:
            tensor = pad_tensor(tensor, longest, dim=0)
        stacked = strategy.all_gather(tensor)
        return torch.cat([stacked[rank, :size] for rank, size in enumerate(sizes)])

    return apply_to_tensors(data, gather_tensor)


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
    return _gather_json(obj, strategy.all_gather, strategy.root_device)


def _gather_json(
    obj: Any, all_gather: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> list[Any]:
    payload = json_bytes(json.dumps(obj), device)
    sizes = all_gather(torch.tensor([payload.numel()], device=device)).flatten().tolist()
    stacked = all_gather(pad_tensor(payload, max(sizes), dim=0))
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
    """:func:`check_shapes` for the tensors of ``data``, every dimension compared (reduce, broadcast)."""
    check_shapes(tensors_of(data), strategy.all_gather, strategy.root_device, caller)


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
