"""How FSDP splits a model into shard units (tied parameters kept together) and initialises the
parameters of a model built on the meta device, shard by shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["reset_sharded", "size_based_units", "split_tie", "tied_parameters"]


def reset_sharded(module: nn.Module, reset: Callable[[], Any]) -> None:
    """``module.reset_parameters()`` for a module whose own parameters are sharded DTensors. Where
    DTensor has no RNG tracker (CPU), each rank would draw its shard from the same RNG state: every
    shard alike (duplicated rows). So the module's parameters are initialised full size (one module
    at a time), and rank 0's values are scattered into the shards: the init of the unsharded model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {n: p for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    full = {
        n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device))
        for n, p in sharded.items()
    }
    module._parameters.update(full)
    try:
        reset()
    finally:
        module._parameters.update(sharded)
    with torch.no_grad():
        for name, param in sharded.items():
            shard = distribute_tensor(full[name].data, param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())


def tied_parameters(root: nn.Module) -> list[dict[int, str]]:
    """Each parameter that several submodules hold (tied weights): the id of each holder -> its name."""
    holders: dict[int, dict[int, str]] = {}
    for prefix, module in root.named_modules():  # a module used in several places counts once
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), {})[id(module)] = f"{prefix}.{name}" if prefix else name
    return [each for each in holders.values() if len(each) > 1]


def split_tie(unit: nn.Module, ties: list[dict[int, str]]) -> tuple[str, str] | None:
    """Names of a tied parameter held inside and outside ``unit``, if making it a unit splits one."""
    inside = {id(m) for m in unit.modules()}
    for holders in ties:
        names = [[n for i, n in holders.items() if (i in inside) == want] for want in (True, False)]
        if names[0] and names[1]:
            return names[0][0], names[1][0]
    return None


def size_based_units(root: nn.Module, min_params: int, ties: list[dict[int, str]]) -> list[nn.Module]:
    """Bottom-up: a module becomes a unit once the parameters below it not yet in a unit reach
    ``min_params``. Containers without a forward (ModuleList/ModuleDict) never do: FSDP gathers
    a unit's parameters in its forward hook. Nor does a module holding a tied parameter whose other
    holder is outside it (an output layer sharing the embedding's weight): its parent gets it."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        pending = sum(p.numel() for p in module.parameters(recurse=False))
        pending += sum(visit(child) for child in module.children())
        if (
            module is not root
            and pending >= min_params
            and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
            and module not in units  # a module used in several places is one unit
            and split_tie(module, ties) is None
        ):
            units.append(module)
            return 0
        return pending

    visit(root)
    return units
