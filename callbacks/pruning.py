"""``ModelPruning``: prune parameters during the fit with ``torch.nn.utils.prune`` (Lightning's callback).

torch's pruning re-parametrises a parameter ``weight`` as ``weight_orig`` (the same ``Parameter``
object, so the optimizer and DDP's gradient hooks keep working on it) times a ``weight_mask``
buffer; a forward pre-hook computes ``weight`` before each forward. Checkpoints saved during the fit
hold ``weight_orig`` and ``weight_mask``: a resumed fit re-creates the re-parametrisation before the
weights load (the callback's state names the pruned parameters), and loading such a checkpoint into
a plain module folds them into ``weight`` (``ember/_weights.py``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from typing_extensions import override

from ember.callbacks._pruning_arguments import check_arguments, resolve_pruning_fn
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ModelPruning"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ParameterList = Sequence[tuple[nn.Module, str]]


def _hooks(module: nn.Module) -> dict[str, torch_prune.BasePruningMethod]:
    """``module``'s pruning pre-hooks by the name of the parameter each prunes."""
    return {
        hook._tensor_name: hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch_prune.BasePruningMethod)
    }


class ModelPruning(Callback):
    """Prune the module's parameters at the end of each training epoch (``prune_on_train_epoch_end=False``:
    of each validation run), as Lightning's ``ModelPruning``.

    ``pruning_fn``: ``"l1_unstructured"``, ``"random_unstructured"``, ``"ln_structured"`` (with
    ``pruning_dim`` and ``pruning_norm``) or ``"random_structured"`` (with ``pruning_dim``), a
    ``torch.nn.utils.prune.BasePruningMethod`` subclass, or (with ``use_global_unstructured=False``) a
    function ``fn(module, name, amount=...)`` such as ``torch.nn.utils.prune.l1_unstructured``.
    ``parameters_to_prune``: ``(module, "weight")`` pairs; None: every ``parameter_names``
    (``("weight", "bias")``) of every layer. ``amount``, ``apply_pruning`` and
    ``use_lottery_ticket_hypothesis`` may be functions of the epoch. With the lottery ticket
    hypothesis, the parameters left are reset to their values at the start of the fit (or, with
    ``resample_parameters``, to a new draw of the layer's ``reset_parameters``) after each pruning.
    ``make_pruning_permanent``: the masks are applied and removed when training ends.

    On several processes rank 0's masks are broadcast, so every process prunes alike. Strategies
    that shard parameters (FSDP, DeepSpeed) are refused when the fit starts.

    Example::

        ModelPruning("l1_unstructured", amount=lambda epoch: 0.2 if epoch % 2 == 0 else 0)
    """

    PARAMETER_NAMES = ("weight", "bias")

    def __init__(
        self,
        pruning_fn: Callable[..., Any] | str,
        parameters_to_prune: ParameterList | None = None,
        parameter_names: Sequence[str] | None = None,
        use_global_unstructured: bool = True,
        amount: int | float | Callable[[int], int | float] = 0.5,
        apply_pruning: bool | Callable[[int], bool] = True,
        make_pruning_permanent: bool = True,
        use_lottery_ticket_hypothesis: bool | Callable[[int], bool] = True,
        resample_parameters: bool = False,
        pruning_dim: int | None = None,
        pruning_norm: int | float | str | None = None,
        verbose: int = 0,
        prune_on_train_epoch_end: bool = True,
    ) -> None:
        check_arguments(
            parameters_to_prune=parameters_to_prune, parameter_names=parameter_names,
            use_global_unstructured=use_global_unstructured, amount=amount, apply_pruning=apply_pruning,
            make_pruning_permanent=make_pruning_permanent, use_lottery_ticket_hypothesis=use_lottery_ticket_hypothesis,
            resample_parameters=resample_parameters, pruning_dim=pruning_dim, pruning_norm=pruning_norm,
            verbose=verbose, prune_on_train_epoch_end=prune_on_train_epoch_end,
        )  # fmt: skip
        self.pruning_fn, self._kwargs, self._method_name = resolve_pruning_fn(
            pruning_fn, use_global_unstructured, pruning_dim, pruning_norm
        )
        self._use_global_unstructured = use_global_unstructured
        self._parameters_given = list(parameters_to_prune or ())
        self._parameter_names = tuple(parameter_names or self.PARAMETER_NAMES)
        self.amount = amount
        self._apply_pruning = apply_pruning
        self._make_pruning_permanent = make_pruning_permanent
        self._use_lottery_ticket_hypothesis = use_lottery_ticket_hypothesis
        self._resample_parameters = resample_parameters
        self._verbose = verbose
        self._prune_on_train_epoch_end = prune_on_train_epoch_end
        self._parameters_to_prune: list[tuple[nn.Module, str]] = []
        self._names: list[str] = []  # "<module path>.<parameter>" of each, in the module
        self._originals: dict[str, torch.Tensor] | None = None  # the lottery ticket's starting values
        self._trainer: Trainer | None = None

    # -- Lightning's extension points ---------------------------------------------------------------
    def filter_parameters_to_prune(self, parameters_to_prune: ParameterList = ()) -> ParameterList:
        """Override to choose among the ``(module, name)`` pairs the callback found."""
        return parameters_to_prune

    @staticmethod
    def sanitize_parameters_to_prune(
        module: nn.Module, parameters_to_prune: ParameterList = (), parameter_names: Sequence[str] = ()
    ) -> list[tuple[nn.Module, str]]:
        """The given pairs, checked to be in ``module``; none given: every layer's ``parameter_names``."""
        from ember.trainer.module import TrainModule  # (the Trainer's modules import the callbacks)

        names = tuple(parameter_names) or ModelPruning.PARAMETER_NAMES
        layers = [m for m in module.modules() if not isinstance(m, (*_CONTAINERS, TrainModule))]
        if not parameters_to_prune:
            return [
                (m, n)
                for n in names
                for m in layers
                if isinstance(getattr(m, n, None), nn.Parameter)
                or isinstance(getattr(m, n + "_orig", None), nn.Parameter)
            ]
        ids = {id(m) for m in module.modules()}
        missing = [f"{type(m).__name__}.{n}" for m, n in parameters_to_prune if id(m) not in ids]
        missing += [
            f"{type(m).__name__}.{n}" for m, n in parameters_to_prune if id(m) in ids and not hasattr(m, n)
        ]
        if missing:
            raise ValueError(
                f"ModelPruning(parameters_to_prune=...): not in the module: {', '.join(missing)}"
            )
        return list(parameters_to_prune)

    def apply_pruning(self, amount: int | float) -> None:
        """Prune ``parameters_to_prune`` by ``amount`` (global or per parameter)."""
        before = [self._pruned_stats(m, n) for m, n in self._parameters_to_prune] if self._verbose else []
        kwargs = {**self._kwargs, "amount": amount}
        if inspect.isclass(self.pruning_fn):  # a method takes the arguments its constructor names
            accepted = set(inspect.signature(self.pruning_fn).parameters) - {"self"}
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if self._use_global_unstructured:
            torch_prune.global_unstructured(
                self._parameters_to_prune, pruning_method=self.pruning_fn, **kwargs
            )
        else:
            method: Any = self.pruning_fn
            for module, name in self._parameters_to_prune:
                if isinstance(method, type) and issubclass(method, torch_prune.BasePruningMethod):
                    method.apply(module, name, **kwargs)
                else:
                    method(module, name, **kwargs)
        if self._verbose:
            self._report(before, [self._pruned_stats(m, n) for m, n in self._parameters_to_prune], amount)

    def apply_lottery_ticket_hypothesis(self) -> None:
        """Reset the parameters left to their values at the start of the fit (the lottery ticket
        hypothesis, step 4), or with ``resample_parameters`` to a new ``reset_parameters()`` draw."""
        assert self._originals is not None
        self._refresh()  # (pruning left each `weight` in the autograd graph: it could not be copied)
        fresh: dict[int, nn.Module] = {}
        with torch.no_grad():
            for (module, name), key in zip(self._parameters_to_prune, self._names, strict=True):
                source = self._originals[key]
                if self._resample_parameters and callable(getattr(module, "reset_parameters", None)):
                    if id(module) not in fresh:
                        clone = copy.deepcopy(module)
                        for pruned in _hooks(clone):
                            torch_prune.remove(clone, pruned)
                        clone.reset_parameters()  # type: ignore[operator]
                        fresh[id(module)] = clone
                    source = getattr(fresh[id(module)], name)
                self._parameter(module, name).copy_(source)

    def make_pruning_permanent(self, module: nn.Module) -> None:
        """Apply the masks and remove the re-parametrisation: plain parameters again."""
        for layer in module.modules():
            for name in _hooks(layer):
                torch_prune.remove(layer, name)

    # -- hooks --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.strategy.supports_weight_averaging:
            raise ValueError(
                f"ModelPruning re-parametrises whole parameters on every process, which the "
                f"{trainer.strategy.strategy_name!r} strategy does not hold (sharded parameters, or an engine "
                "that owns them): use DDP or a single device (Strategy.supports_weight_averaging)"
            )
        self._trainer, self._originals = trainer, None
        self._parameters_to_prune, self._names = [], []

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._resolve(module)
        self._refresh()  # a resumed fit: `weight` from the weight_orig and weight_mask just loaded
        if self._use_lottery_ticket_hypothesis is not False and self._originals is None:
            self._originals = {
                key: self._parameter(m, n).detach().clone()
                for (m, n), key in zip(self._parameters_to_prune, self._names, strict=True)
            }

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._prune_on_train_epoch_end:
            self._run_pruning(trainer, trainer.current_epoch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._prune_on_train_epoch_end and trainer.stage == "fit" and not trainer.sanity_checking:
            self._run_pruning(trainer, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._make_pruning_permanent:
            self.make_pruning_permanent(module)

    # -- state: which parameters are pruned, and the lottery ticket's starting values ----------------
    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer  # (set up: its module is attached)
        if trainer is None:
            return {}
        module = trainer.module
        pruned = [f"{path}.{n}" if path else n for path, m in module.named_modules() for n in _hooks(m)]
        return {"pruned": pruned, "originals": dict(self._originals) if self._originals is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The Trainer loads callback states before the weights (trainer/checkpointing.py): the pruned
        # parameters become weight_orig and weight_mask now, so that the saved ones load into them.
        originals = state_dict.get("originals")
        self._originals = dict(originals) if originals is not None else None
        trainer = self._trainer  # None: a state loaded before any fit set this callback up
        if trainer is None:
            return
        module = trainer.module
        for key in state_dict.get("pruned", []):
            path, _, name = key.rpartition(".")
            layer = module.get_submodule(path)
            if name not in _hooks(layer):
                torch_prune.identity(layer, name)
        self._resolve(module)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if self._originals is not None:
            self._originals = {k: v.to(device) for k, v in self._originals.items()}

    # -- internals ----------------------------------------------------------------------------------
    def _resolve(self, module: nn.Module) -> None:
        found = self.sanitize_parameters_to_prune(module, self._parameters_given, self._parameter_names)
        self._parameters_to_prune = list(self.filter_parameters_to_prune(found))
        if not self._parameters_to_prune:
            raise ValueError(
                f"ModelPruning found nothing to prune: no layer of {type(module).__name__} has a parameter named "
                f"{' or '.join(self._parameter_names)}"
            )
        paths = {id(m): path for path, m in module.named_modules()}
        self._names = [f"{paths[id(m)]}.{n}" if paths[id(m)] else n for m, n in self._parameters_to_prune]

    @staticmethod
    def _parameter(module: nn.Module, name: str) -> torch.Tensor:
        """The trained tensor of ``module.<name>``: ``<name>_orig`` once pruned."""
        tensor: torch.Tensor = getattr(module, name + "_orig" if name in _hooks(module) else name)
        return tensor

    def _refresh(self) -> None:
        """Recompute each pruned ``weight`` from ``weight_orig`` and ``weight_mask`` (the forward
        pre-hook does it before each forward; the last optimizer step came after it)."""
        with torch.no_grad():
            for module, name in self._parameters_to_prune:
                hook = _hooks(module).get(name)
                if hook is not None:
                    setattr(module, name, hook.apply_mask(module))

    def _run_pruning(self, trainer: Trainer, epoch: int) -> None:
        apply = self._apply_pruning(epoch) if callable(self._apply_pruning) else self._apply_pruning
        amount = self.amount(epoch) if callable(self.amount) else self.amount
        if not apply or not amount:
            return
        self._refresh()  # prune the weights as they are now
        self.apply_pruning(amount)
        lottery = self._use_lottery_ticket_hypothesis
        if lottery(epoch) if callable(lottery) else lottery:
            self.apply_lottery_ticket_hypothesis()
        if trainer.world_size > 1:
            self._agree(trainer)
        self._refresh()

    def _agree(self, trainer: Trainer) -> None:
        """Rank 0's masks (and resampled values) on every process: random pruning draws differ per
        process, and DDP broadcasts only the buffers the module had when it was wrapped."""
        tensors = [getattr(m, n + "_mask") for m, n in self._parameters_to_prune if n in _hooks(m)]
        if self._resample_parameters:
            tensors += [self._parameter(m, n) for m, n in self._parameters_to_prune]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = trainer.strategy.broadcast(torch.cat([t.reshape(-1) for t in group]), 0)
                for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    tensor.copy_(part.view_as(tensor))

    @staticmethod
    def _pruned_stats(module: nn.Module, name: str) -> tuple[int, int]:
        mask = getattr(module, name + "_mask", None)
        return (0, getattr(module, name).numel()) if mask is None else (int((mask == 0).sum()), mask.numel())

    def _report(
        self, before: list[tuple[int, int]], after: list[tuple[int, int]], amount: int | float
    ) -> None:
        trainer = self._trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        total = sum(size for _, size in after)
        zeros_before, zeros_after = sum(z for z, _ in before), sum(z for z, _ in after)
        print(
            f"Applied `{self._method_name}`. Pruned: {zeros_before}/{total} ({zeros_before / total:.2%}) -> "
            f"{zeros_after}/{total} ({zeros_after / total:.2%})",
            flush=True,
        )
        if self._verbose == 2:
            for key, (z0, size), (z1, _) in zip(self._names, before, after, strict=True):
                print(
                    f"Applied `{self._method_name}` to `{key}` with amount={amount}. Pruned: "
                    f"{z0} ({z0 / size:.2%}) -> {z1} ({z1 / size:.2%})",
                    flush=True,
                )
