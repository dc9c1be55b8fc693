"""Preparing models whose set-up replaces their parameter objects (FSDP shards them; moving to an
XLA device makes new ones), with the optimizers that hold the old ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ember.strategies.base import Strategy

__all__ = ["setup_rebinding_optimizers"]


def setup_rebinding_optimizers(
    strategy: Strategy, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """``strategy.setup_module`` for each module, for strategies whose set-up replaces parameter
    objects (FSDP shards them; moving to an XLA device makes new ones): each optimizer's parameter
    is found again by its (module, name) and the optimizer is pointed at the replacement."""
    owners = {id(p): (m, name) for m in modules for name, p in m.named_parameters()}
    plans = []
    for optimizer in optimizers:
        if optimizer.state:
            raise ValueError(
                f"prepare() the optimizer before its first step: strategy={strategy.strategy_name!r} replaces "
                "the parameters it holds"
            )
        groups = []
        for group in optimizer.param_groups:
            if any(id(p) not in owners for p in group["params"]):
                raise ValueError(
                    f"strategy={strategy.strategy_name!r}: prepare() the optimizer together with the model whose "
                    "parameters it holds"
                )
            groups.append([owners[id(p)] for p in group["params"]])
        plans.append((optimizer, groups))
    prepared = [strategy.setup_module(m) for m in modules]
    for optimizer, groups in plans:
        for group, params in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = [module.get_parameter(name) for module, name in params]
    return prepared, list(optimizers)
