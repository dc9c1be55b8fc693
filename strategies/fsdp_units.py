"""How FSDP splits a model into shard units (tied parameters kept together), which modules a wrapping
or checkpointing option selects, and how the parameters of a model built on the meta device are
initialised, shard by shard."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModuleSpec",
    "is_module_spec",
    "is_selection",
    "reset_sharded",
    "resolve_classes",
    "selected_modules",
    "size_based_units",
    "split_tie",
    "tied_parameters",
]

ModuleSpec = set[type[nn.Module] | str]  # module classes, or their names (resolved against the model)


def is_module_spec(value: Any) -> bool:
    """A set of ``nn.Module`` classes or class names."""
    return isinstance(value, (set, frozenset)) and all(
        (isinstance(c, type) and issubclass(c, nn.Module)) or (isinstance(c, str) and c) for c in value
    )


def resolve_classes(
    root: nn.Module, spec: Collection[type[nn.Module] | str], option: str
) -> tuple[type[nn.Module], ...]:
    """The classes of ``spec``, class names looked up among ``root``'s submodules (as 🤗 Accelerate's
    ``transformer_cls_names_to_wrap``): a name that matches none is a typo, not an empty policy."""
    found = {type(m).__name__: type(m) for m in root.modules()}
    missing = sorted(c for c in spec if isinstance(c, str) and c not in found)
    if missing:
        raise ValueError(
            f"FSDPConfig({option}=...): the model has no submodule of class {', '.join(map(repr, missing))}. "
            f"Valid choices in this model: {', '.join(sorted(found))}"
        )
    return tuple(found[c] if isinstance(c, str) else c for c in spec)


def is_selection(value: Any) -> bool:
    """What ``wrap`` and ``activation_checkpointing`` select modules with: a set of classes (or
    names), a predicate, or a torch wrapping policy (``CustomPolicy`` is not callable)."""
    if isinstance(value, type):  # a class is callable, but no predicate: Block(module) would build one
        return False
    return is_module_spec(value) or callable(value) or callable(getattr(value, "_run_policy", None))


def _is_fsdp1_policy(policy: Callable[..., Any]) -> bool:
    """torch's FSDP1 ``auto_wrap_policy(module, recurse, nonwrapped_numel)`` form (Lightning passes
    it), rather than ember's predicate ``module -> bool``."""
    try:
        return "recurse" in inspect.signature(policy).parameters
    except (TypeError, ValueError):  # no signature (a builtin): a predicate
        return False


def selected_modules(root: nn.Module, spec: Any, option: str) -> list[nn.Module]:
    """The submodules of ``root`` (never ``root``) that ``spec`` selects, children before parents:
    every instance of a set of classes, those a predicate ``module -> bool`` accepts, or those torch's
    FSDP1 wrapping policies (``ModuleWrapPolicy``, ``CustomPolicy``, ``functools.partial(
    size_based_auto_wrap_policy, ...)``, ...) would wrap, chosen as FSDP1 chooses them."""
    order = [m for m in reversed(list(root.modules())) if m is not root]
    if isinstance(spec, (set, frozenset)):
        classes = resolve_classes(root, spec, option)
        return [m for m in order if isinstance(m, classes)]
    run_policy = getattr(spec, "_run_policy", None)
    if callable(run_policy):  # torch.distributed.fsdp.wrap._Policy: it returns module -> FSDP1 kwargs
        chosen: dict[nn.Module, dict[str, Any]] = run_policy(root, set(), {})
        if any(chosen.values()):
            raise ValueError(
                f"FSDPConfig({option}={type(spec).__name__}(...)): the policy returns per-module FSDP1 settings "
                f"({next(v for v in chosen.values() if v)}); FSDP2 takes one setting for the whole model. "
                "Return True/False from the policy's function"
            )
        return [m for m in order if m in chosen]
    if _is_fsdp1_policy(spec):
        return _fsdp1_policy_modules(root, spec)
    return [m for m in order if spec(m)]


def _fsdp1_policy_modules(root: nn.Module, policy: Callable[..., bool]) -> list[nn.Module]:
    """What FSDP1's recursive auto-wrap wraps: a module is entered when ``policy(recurse=True)``
    says so, its children first, then it is wrapped when ``policy(recurse=False)`` accepts the
    parameters its wrapped children left over."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> int:  # the parameters wrapped at or below module
        total = sum(p.numel() for p in module.parameters())
        if module in found or not policy(module=module, recurse=True, nonwrapped_numel=total):
            return 0
        wrapped = sum(visit(child) for child in module.children())
        if module is not root and policy(module=module, recurse=False, nonwrapped_numel=total - wrapped):
            found.append(module)
            return total
        return wrapped

    visit(root)
    return found


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
