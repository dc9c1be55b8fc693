"""``BaseFinetuning``: freeze part of a module, unfreeze it during the fit (``BackboneFinetuning``
in ``backbone_finetuning.py`` is the ready-made one).

As Lightning's callbacks of the same names, with one difference that matters under DDP: the
freeze runs in ``setup("fit")``, before the Trainer prepares (wraps) the module, and when
``finetune_function`` changes which parameters require grad the Trainer has the strategy wrap the
module anew (``Strategy.refresh_trainable``), so the unfrozen parameters' gradients are all-reduced
with ``find_unused_parameters=False``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from ember._validation import show
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["BaseFinetuning"]

log = logging.getLogger(__name__)
Modules = nn.Module | Iterable[nn.Module | Iterable[Any]]
_SIMPLE = (bool, int, float, str, type(None))


def _json_value(value: Any) -> bool:
    """Whether a parameter-group hyper-parameter can be kept in the callback's (JSON) state."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE) and not (isinstance(value, float) and not math.isfinite(value))


class BaseFinetuning(Callback):
    """Base class for callbacks that freeze modules before training and unfreeze them during it.

    Override :meth:`freeze_before_training` (called in ``setup("fit")``, before the module is
    prepared) and :meth:`finetune_function` (called at every ``on_train_epoch_start``, once per
    optimizer). The static helpers do the freezing and add unfrozen parameters to an optimizer.
    The parameter groups added are saved in the callback's state and re-added, with the trainable
    flags, before a resumed fit loads the optimizer state: the resumed fit ends as the uninterrupted one.

    Example::

        class UnfreezeAt(BaseFinetuning):
            def freeze_before_training(self, module):
                self.freeze(module.encoder)

            def finetune_function(self, module, epoch, optimizer):
                if epoch == 2:
                    self.unfreeze_and_add_param_group(module.encoder, optimizer, lr=1e-4)
    """

    def __init__(self) -> None:
        #: per optimizer index, the parameter groups (parameters by name) as finetune_function left them
        self._internal_optimizer_metadata: dict[int, list[dict[str, Any]]] = {}
        self._restarting = False
        self._restored: dict[str, Any] | None = None
        # The Trainer of the last fit set up: its module's flags go in the state (also in a checkpoint
        # saved after the fit), and a state loaded during its restore applies at once.
        self._trainer: Trainer | None = None

    # -- to override ------------------------------------------------------------------------------
    def freeze_before_training(self, module: TrainModule) -> None:
        """Freeze what must not train at first (``self.freeze(module.backbone)``). Does nothing here."""

    def finetune_function(self, module: TrainModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Unfreeze at the epochs you choose (``self.unfreeze_and_add_param_group(...)``). Does nothing here."""

    # -- static helpers (Lightning's) ------------------------------------------------------------
    @staticmethod
    def flatten_modules(modules: Modules) -> list[nn.Module]:
        """The leaf modules of ``modules`` (a module, a ``ModuleDict`` or an iterable of them), and
        the parent modules that hold parameters of their own."""
        if isinstance(modules, nn.ModuleDict):
            modules = modules.values()
        found: Iterable[nn.Module]
        if isinstance(modules, nn.Module):
            found = modules.modules()
        elif isinstance(modules, Iterable):
            found = [leaf for item in modules for leaf in BaseFinetuning.flatten_modules(item)]
        else:
            raise TypeError(
                f"expected a torch.nn.Module or an iterable of them, got {type(modules).__name__}"
            )
        return [m for m in found if not list(m.children()) or m._parameters]

    @staticmethod
    def filter_params(
        modules: Modules, train_bn: bool = True, requires_grad: bool = True
    ) -> Iterator[nn.Parameter]:
        """The parameters of ``modules`` whose ``requires_grad`` equals ``requires_grad``; those of
        BatchNorm layers only with ``train_bn``."""
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm) and not train_bn:
                continue
            for param in module.parameters(recurse=False):  # (a parent's own, once)
                if param.requires_grad == requires_grad:
                    yield param

    @staticmethod
    def make_trainable(modules: Modules) -> None:
        """Unfreeze ``modules``: every parameter requires grad, BatchNorm layers track statistics."""
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm):
                module.track_running_stats = True
            for param in module.parameters(recurse=False):
                param.requires_grad = True

    @staticmethod
    def freeze_module(module: nn.Module) -> None:
        """Freeze ``module``'s own parameters (a BatchNorm layer also stops tracking statistics)."""
        if isinstance(module, _BatchNorm):
            module.track_running_stats = False
        for param in module.parameters(recurse=False):
            param.requires_grad = False

    @staticmethod
    def freeze(modules: Modules, train_bn: bool = True) -> None:
        """Freeze ``modules``; with ``train_bn`` their BatchNorm layers stay trainable."""
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm) and train_bn:
                BaseFinetuning.make_trainable(module)
            else:
                BaseFinetuning.freeze_module(module)

    @staticmethod
    def filter_on_optimizer(
        optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
    ) -> list[nn.Parameter]:
        """``params`` less those already in one of ``optimizer``'s groups (with a warning naming
        how many). By identity: Lightning compares values, which drops a new parameter equal to
        one the optimizer holds (two zero-initialised biases)."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = list(params)
        kept = [p for p in params if id(p) not in held]
        if len(kept) < len(params):
            log.warning(
                "%d of the parameters to add are already in a group of this optimizer and are skipped "
                "(was it built with all the module's parameters?)",
                len(params) - len(kept),
            )
        return kept

    @staticmethod
    def unfreeze_and_add_param_group(
        modules: Modules,
        optimizer: torch.optim.Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> None:
        """Unfreeze ``modules`` and add their parameters to ``optimizer`` as a new group, with
        learning rate ``lr`` (default: the first group's divided by ``initial_denom_lr``)."""
        BaseFinetuning.make_trainable(modules)
        base_lr = optimizer.param_groups[0]["lr"] if lr is None else float(lr)
        denominator = initial_denom_lr if lr is None else 1.0
        params = BaseFinetuning.filter_on_optimizer(
            optimizer, BaseFinetuning.filter_params(modules, train_bn=train_bn, requires_grad=True)
        )
        if params:
            optimizer.add_param_group({"params": params, "lr": base_lr / denominator})

    # -- hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not strategy.supports_trainable_refresh:
            raise ValueError(
                f"{type(self).__name__} changes which parameters train during the fit, and the "
                f"{strategy.strategy_name!r} strategy cannot follow that (Strategy.supports_trainable_refresh): "
                "use DDP or a single device"
            )
        self._trainer = trainer
        self._internal_optimizer_metadata = {}
        # Before prepare(): DDP wraps the module with the parameters that train from the first step.
        self.freeze_before_training(module)

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._restored is not None:  # (a state loaded outside a fit's restore)
            self._apply_restored(trainer, module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            before = len(optimizer.param_groups)
            self.finetune_function(module, trainer.current_epoch, optimizer)
            self._store(module, index, before, optimizer.param_groups)
            if len(optimizer.param_groups) > before:
                _extend_schedulers(trainer, optimizer, before)
        # The Trainer re-wraps the model right after this hook if the trainable set changed.

    # -- checkpoints ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "internal_optimizer_metadata": {str(k): v for k, v in self._internal_optimizer_metadata.items()}
        }
        trainer = self._trainer
        if trainer is not None:  # what is frozen now: a resumed fit starts from the same flags
            module = trainer.module
            state["trainable"] = [name for name, p in module.named_parameters() if p.requires_grad]
            state["untracked_bn"] = [
                name
                for name, layer in module.named_modules()
                if isinstance(layer, _BatchNorm) and not layer.track_running_stats
            ]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The Trainer loads callback states before the optimizer state (trainer/checkpointing.py):
        # the groups are re-added now, so that the saved optimizer state fits the optimizer.
        self._restarting = True
        self._restored = dict(state_dict)
        if self._trainer is not None:
            self._apply_restored(self._trainer, self._trainer.module)

    # -- internals --------------------------------------------------------------------------------
    def _store(self, module: nn.Module, index: int, before: int, groups: list[dict[str, Any]]) -> None:
        names = {id(p): name for name, p in module.named_parameters()}
        metadata = self._internal_optimizer_metadata
        if index not in metadata:
            metadata[index] = [_group_by_name(group, names) for group in groups]
        elif len(groups) != before:  # groups finetune_function added
            metadata[index].extend(_group_by_name(group, names) for group in groups[before:])

    def _apply_restored(self, trainer: Trainer, module: nn.Module) -> None:
        restored, self._restored = self._restored, None
        assert restored is not None
        metadata = {int(k): list(v) for k, v in restored.get("internal_optimizer_metadata", {}).items()}
        parameters = dict(module.named_parameters())
        for index, optimizer in enumerate(trainer.optimizers):
            saved = metadata.get(index, [])
            present = len(optimizer.param_groups)
            for group in saved[present:]:
                missing = [name for name in group["params"] if name not in parameters]
                if missing:
                    raise ValueError(
                        f"{type(self).__name__}: the checkpoint's parameter group names parameters the module "
                        f"does not have: {show(missing)}"
                    )
                optimizer.add_param_group({**group, "params": [parameters[n] for n in group["params"]]})
            if len(saved) > present:
                _extend_schedulers(trainer, optimizer, present)
        self._internal_optimizer_metadata = metadata
        if "trainable" in restored:
            trainable = set(restored["trainable"])
            for name, param in parameters.items():
                param.requires_grad = name in trainable
            untracked = set(restored.get("untracked_bn", []))
            for name, layer in module.named_modules():
                if isinstance(layer, _BatchNorm):
                    layer.track_running_stats = name not in untracked
        self._restarting = False


def _group_by_name(group: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """A parameter group with its parameters by name and its JSON-able hyper-parameters."""
    kept = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in group.items()
        if k != "params" and _json_value(v)
    }
    return {**kept, "params": [names[id(p)] for p in group["params"]]}


def _extend_schedulers(trainer: Trainer, optimizer: torch.optim.Optimizer, first_new: int) -> None:
    """Tell ``optimizer``'s LR schedulers of its groups from ``first_new`` on: schedules computed
    from ``base_lrs`` (cosine, one-cycle, ...) then cover them, starting from each group's learning
    rate, and ``ReduceLROnPlateau`` gets a ``min_lr`` for each (torch sizes both at construction)."""
    new = optimizer.param_groups[first_new:]
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        for group in new:
            group.setdefault("initial_lr", group["lr"])
        for name, values in (
            ("base_lrs", [g["initial_lr"] for g in new]),
            ("_last_lr", [g["lr"] for g in new]),
        ):
            current = getattr(scheduler, name, None)
            if isinstance(current, list) and len(current) == first_new:
                current.extend(values)
        min_lrs = getattr(scheduler, "min_lrs", None)
        if isinstance(min_lrs, list) and len(min_lrs) == first_new and min_lrs:
            min_lrs.extend([min_lrs[-1]] * len(new))
