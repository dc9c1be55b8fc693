"""``save_state`` / ``load_state`` pre-hooks (🤗 Accelerate's ``register_save_state_pre_hook`` and
``register_load_state_pre_hook``): what they are given, and what ``save_state`` writes after them.

A save hook is called as ``hook(models, weights, output_dir)`` before any model is written: it may
change the state dicts in ``weights`` in place, or pop entries (those models are not saved; the
others are saved as model 0, 1, ... in order). A load hook is called as ``hook(models, input_dir)``
before any model is loaded: the models it pops are not loaded, and the others take the saved models
in order. Both lists are copies: a hook never changes which objects the Accelerator holds.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ember.strategies import Strategy

SaveStateHook = Callable[[list[nn.Module], list[dict[str, torch.Tensor]], str], None]
LoadStateHook = Callable[[list[nn.Module], str], None]


@dataclass(slots=True)
class StateHooks:
    """The pre-hooks registered on one Accelerator, in registration order (keyed by handle id)."""

    save: OrderedDict[int, SaveStateHook] = field(default_factory=OrderedDict)
    load: OrderedDict[int, LoadStateHook] = field(default_factory=OrderedDict)


def register(hooks: OrderedDict[int, Any], hook: object, method: str) -> RemovableHandle:
    if not callable(hook):
        raise TypeError(f"{method}(hook) takes a callable, not {type(hook).__name__}")
    handle = RemovableHandle(hooks)  # handle.remove() deletes hooks[handle.id]
    hooks[handle.id] = hook
    return handle


def run_save_hooks(
    strategy: Strategy, hooks: StateHooks, models: list[nn.Module], layout: str, staging: Path
) -> list[dict[str, torch.Tensor]]:
    """The weights the save hooks left, one state dict per model to save, keyed by the names in the
    user's modules. ``layout`` ``"sharded"``: this rank's shards (DTensors), else full tensors."""
    if layout == "sharded":
        weights = [strategy.module_state_dict(model, full=False) for model in models]
    else:
        # Whole state dicts, so that a hook sees and edits them (ember streams them otherwise).
        # Under a sharded strategy gathering them is a collective: every rank takes part here,
        # and writing them below needs no collective, so a hook may pop on the main process only.
        weights = [dict(strategy.full_tensors(model)[1]) for model in models]
    for hook in list(hooks.save.values()):
        hook(list(models), weights, os.fspath(staging))  # output_dir: the directory being written
    for i, state in enumerate(weights):
        if not (
            isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        ):
            raise TypeError(
                f"after the save_state pre-hooks, weights[{i}] is a {type(state).__name__}; each entry must "
                "stay a state dict (tensor names to tensors), or be popped to leave its model out"
            )
    if layout == "sharded":
        # Every rank writes its own shards of each model, together (a collective per model).
        counts = strategy.all_gather(torch.tensor([len(weights)], dtype=torch.int64)).flatten().tolist()
        if len(set(counts)) > 1:
            raise ValueError(
                f"save_state pre-hooks left different numbers of weights on the processes ({counts}, by rank): "
                f"strategy {strategy.strategy_name!r} writes sharded checkpoints, in which every process "
                "writes its shards of every model, so pop the same entries of `weights` on every process"
            )
    return weights


def run_load_hooks(hooks: StateHooks, models: list[nn.Module], directory: Path) -> list[nn.Module]:
    """The models the load hooks left, to take the checkpoint's models in order."""
    remaining = list(models)
    for hook in list(hooks.load.values()):
        hook(remaining, os.fspath(directory))
    for i, model in enumerate(remaining):
        if not any(model is prepared for prepared in models):
            raise TypeError(
                f"after the load_state pre-hooks, models[{i}] ({type(model).__name__}) is not one of the "
                "prepared models; a load_state pre-hook may only pop entries of `models`"
            )
    return remaining
