"""``ModelPruning``'s arguments: their checks, and ``pruning_fn`` resolved to what torch prunes with."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch.nn.utils.prune as torch_prune
from torch import nn

from ember._validation import check_bool, check_choice, show

__all__ = ["check_arguments", "resolve_pruning_fn"]

_FUNCTIONS = {
    "ln_structured": torch_prune.ln_structured,
    "l1_unstructured": torch_prune.l1_unstructured,
    "random_structured": torch_prune.random_structured,
    "random_unstructured": torch_prune.random_unstructured,
}
_METHODS: dict[str, type[torch_prune.BasePruningMethod]] = {
    "ln_structured": torch_prune.LnStructured,
    "l1_unstructured": torch_prune.L1Unstructured,
    "random_structured": torch_prune.RandomStructured,
    "random_unstructured": torch_prune.RandomUnstructured,
}


def _flag(name: str, value: Any) -> None:
    if not (isinstance(value, bool) or callable(value)):
        raise TypeError(f"ModelPruning({name}={show(value)}) must be True, False or a function of the epoch")


def _check_amount(amount: Any) -> None:
    if callable(amount):
        return
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(
            f"ModelPruning(amount={show(amount)}) must be a float in [0, 1], an int >= 0 or a function of the epoch"
        )
    if (isinstance(amount, float) and not 0.0 <= amount <= 1.0) or (isinstance(amount, int) and amount < 0):
        raise ValueError(
            f"ModelPruning(amount={show(amount)}) must be a float in [0, 1] (a fraction) or an int >= 0 (a count)"
        )


def check_arguments(
    *,
    parameters_to_prune: Any,
    parameter_names: Any,
    use_global_unstructured: Any,
    amount: Any,
    apply_pruning: Any,
    make_pruning_permanent: Any,
    use_lottery_ticket_hypothesis: Any,
    resample_parameters: Any,
    pruning_dim: Any,
    pruning_norm: Any,
    verbose: Any,
    prune_on_train_epoch_end: Any,
) -> None:
    """Each argument but ``pruning_fn`` (:func:`resolve_pruning_fn`): ``TypeError`` / ``ValueError`` naming it."""
    for name, flag in (
        ("use_global_unstructured", use_global_unstructured),
        ("make_pruning_permanent", make_pruning_permanent),
        ("resample_parameters", resample_parameters),
        ("prune_on_train_epoch_end", prune_on_train_epoch_end),
    ):
        check_bool(name, flag, owner="ModelPruning")
    _flag("apply_pruning", apply_pruning)
    _flag("use_lottery_ticket_hypothesis", use_lottery_ticket_hypothesis)
    _check_amount(amount)
    check_choice("verbose", verbose, (0, 1, 2), owner="ModelPruning")
    if parameter_names is not None and (
        isinstance(parameter_names, str)
        or not isinstance(parameter_names, Sequence)
        or not parameter_names
        or not all(isinstance(n, str) and n for n in parameter_names)
    ):
        raise TypeError(
            f"ModelPruning(parameter_names={show(parameter_names)}) must be a non-empty list of parameter names "
            "such as ['weight'], or None (weight and bias)"
        )
    if parameters_to_prune is not None and (
        not isinstance(parameters_to_prune, (list, tuple))
        or not all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and isinstance(p[0], nn.Module)
            and isinstance(p[1], str)
            for p in parameters_to_prune
        )
    ):
        raise TypeError(
            f"ModelPruning(parameters_to_prune={show(parameters_to_prune)}) must be a list of (nn.Module, "
            "'parameter name') pairs, or None (every layer's parameter_names)"
        )
    if pruning_dim is not None and (isinstance(pruning_dim, bool) or not isinstance(pruning_dim, int)):
        raise TypeError(f"ModelPruning(pruning_dim={show(pruning_dim)}) must be an int or None")
    if pruning_norm is not None and (
        isinstance(pruning_norm, bool) or not isinstance(pruning_norm, (int, float, str))
    ):
        raise TypeError(
            f"ModelPruning(pruning_norm={show(pruning_norm)}) must be a number (the n of the Ln norm), "
            "'fro', 'nuc' or None"
        )


def resolve_pruning_fn(
    pruning_fn: Any, use_global: bool, dim: int | None, norm: Any
) -> tuple[Any, dict[str, Any], str]:
    """What prunes: a ``BasePruningMethod`` subclass (global pruning, or a method given) or a function
    ``fn(module, name, amount=...)``; the keyword arguments a name implies (``dim``, ``n``); its name."""
    kwargs: dict[str, Any] = {}
    if isinstance(pruning_fn, str):
        key = pruning_fn.lower()
        if key not in _FUNCTIONS:
            raise ValueError(
                f"ModelPruning(pruning_fn={pruning_fn!r}) is not one of torch's pruning functions. "
                f"Valid choices: {', '.join(map(repr, _FUNCTIONS))}"
            )
        if key.endswith("_structured") and dim is None:
            raise ValueError(f"ModelPruning(pruning_fn={key!r}) prunes along a dimension: give pruning_dim")
        if key == "ln_structured" and norm is None:
            raise ValueError(
                "ModelPruning(pruning_fn='ln_structured') needs pruning_norm (the n of the Ln norm)"
            )
        kwargs = {"dim": dim} if key.endswith("_structured") else {}
        if key == "ln_structured":
            kwargs["n"] = norm
        name = _METHODS[key].__name__
        method: Any = _METHODS[key] if use_global else _FUNCTIONS[key]
    elif isinstance(pruning_fn, torch_prune.BasePruningMethod):
        raise TypeError(
            f"ModelPruning(pruning_fn={show(pruning_fn)}) is a pruning method instance: pass its class"
        )
    elif inspect.isclass(pruning_fn) and issubclass(pruning_fn, torch_prune.BasePruningMethod):
        method, name = pruning_fn, pruning_fn.__name__
    elif callable(pruning_fn) and not inspect.isclass(pruning_fn):
        if use_global:
            raise ValueError(
                f"ModelPruning(pruning_fn={show(pruning_fn)}): a function prunes one parameter at a time; "
                "use_global_unstructured=True needs a name or a BasePruningMethod subclass"
            )
        method, name = pruning_fn, getattr(pruning_fn, "__name__", repr(pruning_fn))
    else:
        raise TypeError(
            f"ModelPruning(pruning_fn={show(pruning_fn)}) must be one of {list(_FUNCTIONS)}, a "
            "torch.nn.utils.prune.BasePruningMethod subclass or a function (module, name, amount)"
        )
    kind = getattr(method, "PRUNING_TYPE", "unstructured") if inspect.isclass(method) else "unstructured"
    if use_global and kind != "unstructured":
        raise ValueError(
            f"ModelPruning(pruning_fn={show(pruning_fn)}) prunes {kind}: use_global_unstructured=True only "
            "takes unstructured pruning; pass use_global_unstructured=False"
        )
    return method, kwargs, name
