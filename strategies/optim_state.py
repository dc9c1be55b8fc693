"""Optimizer state keyed by parameter name, so it moves between strategies.

``torch.optim.Optimizer.state_dict()`` keys each parameter's state by its position in the
optimizer's groups. ember's checkpoints key it by the parameter's name in its module (the fully
qualified name that ``torch.distributed.checkpoint.state_dict`` uses for sharded models), so the
state saved under single-device or DDP training loads under FSDP, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["is_named", "owner_module", "parameter_names", "to_indexed", "to_named"]


def owner_module(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> nn.Module | None:
    """The prepared module that holds every parameter of ``optimizer`` (``None`` if there is none)."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    return None


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]] | None:
    """The names of the optimizer's parameters in ``module``, group by group (``None`` if one has none)."""
    names = {id(p): name for name, p in module.named_parameters()}
    groups = [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]
    if any(name is None for group in groups for name in group):
        return None
    return groups  # type: ignore[return-value]


def is_named(state: dict[str, Any]) -> bool:
    return any(isinstance(p, str) for group in state.get("param_groups", []) for p in group["params"])


def to_named(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Index-keyed ``state`` (as ``Optimizer.state_dict()`` returns it) -> keyed by parameter name."""
    if is_named(state):
        return state
    flat = [name for group in names for name in group]
    return {
        "state": {flat[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": list(group_names)}
            for group, group_names in zip(state["param_groups"], names, strict=True)
        ],
    }


def to_indexed(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Name-keyed ``state`` -> what ``Optimizer.load_state_dict()`` takes, for an optimizer whose
    groups hold the parameters ``names``. Groups must match by parameter names, in order."""
    if not is_named(state):
        return state
    saved = [list(group["params"]) for group in state["param_groups"]]
    if saved != names:
        missing = sorted({n for g in names for n in g} - {n for g in saved for n in g})
        unexpected = sorted({n for g in saved for n in g} - {n for g in names for n in g})
        raise ValueError(
            "the saved optimizer state does not fit this optimizer: "
            + (f"missing parameters {missing}; " if missing else "")
            + (f"unexpected parameters {unexpected}; " if unexpected else "")
            + (
                f"{len(saved)} saved parameter groups vs {len(names)}"
                if len(saved) != len(names)
                else "same parameters, grouped or ordered differently"
            )
        )
    index = {name: i for i, name in enumerate(n for group in names for n in group)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }
