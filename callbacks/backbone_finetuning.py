"""``BackboneFinetuning``: freeze ``module.backbone``, unfreeze it at a given epoch with its own
learning rate (Lightning's callback of the same name, built on :class:`BaseFinetuning`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from ember._validation import check_bool, check_int, check_number, show
from ember.callbacks.finetuning import BaseFinetuning

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["BackboneFinetuning", "multiplicative"]

log = logging.getLogger(__name__)


def multiplicative(epoch: int) -> float:
    """``BackboneFinetuning``'s default ``lambda_func``: the backbone's learning rate doubles every epoch
    (Lightning's factor)."""
    return 2.0


class BackboneFinetuning(BaseFinetuning):
    """Freeze ``module.backbone``; unfreeze it at epoch ``unfreeze_backbone_at_epoch`` with its own
    learning rate, which grows by ``lambda_func(epoch + 1)`` every epoch after (Lightning's callback).

    At the unfreeze epoch the backbone's group starts at ``backbone_initial_lr``, else at the first
    group's learning rate times ``backbone_initial_ratio_lr``. Each later epoch it is
    ``lambda_func(epoch + 1) * previous``, capped at the first group's learning rate with
    ``should_align``. ``train_bn``: the backbone's BatchNorm layers train while it is frozen.
    ``verbose``: the two learning rates are logged (rounded to ``rounding`` digits) on global rank 0.
    ``initial_denom_lr`` is passed to :meth:`unfreeze_and_add_param_group`.

    Example::

        Trainer(max_epochs=20, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=5)])
    """

    def __init__(
        self,
        unfreeze_backbone_at_epoch: int = 10,
        lambda_func: Callable[[int], float] = multiplicative,
        backbone_initial_ratio_lr: float = 10e-2,
        backbone_initial_lr: float | None = None,
        should_align: bool = True,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
        verbose: bool = False,
        rounding: int = 12,
    ) -> None:
        super().__init__()
        owner = "BackboneFinetuning"
        check_int("unfreeze_backbone_at_epoch", unfreeze_backbone_at_epoch, minimum=0, owner=owner)
        if not callable(lambda_func):
            raise TypeError(f"{owner}(lambda_func={show(lambda_func)}) must be a function epoch -> float")
        check_number(
            "backbone_initial_ratio_lr", backbone_initial_ratio_lr, minimum=0, above=True, owner=owner
        )
        check_number(
            "backbone_initial_lr", backbone_initial_lr, minimum=0, above=True, owner=owner, optional=True
        )
        check_number("initial_denom_lr", initial_denom_lr, minimum=0, above=True, owner=owner)
        for name, value in (("should_align", should_align), ("train_bn", train_bn), ("verbose", verbose)):
            check_bool(name, value, owner=owner)
        check_int("rounding", rounding, minimum=0, owner=owner)
        self.unfreeze_backbone_at_epoch = unfreeze_backbone_at_epoch
        self.lambda_func = lambda_func
        self.backbone_initial_ratio_lr = backbone_initial_ratio_lr
        self.backbone_initial_lr = backbone_initial_lr
        self.should_align = should_align
        self.initial_denom_lr = initial_denom_lr
        self.train_bn = train_bn
        self.verbose = verbose
        self.rounding = rounding
        self.previous_backbone_lr: float | None = None

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and not isinstance(getattr(module, "backbone", None), nn.Module):
            raise ValueError(
                f"BackboneFinetuning needs module.backbone, an nn.Module; {type(module).__name__}.backbone is "
                f"{show(getattr(module, 'backbone', None))}: set self.backbone in __init__"
            )
        super().setup(trainer, module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous_backbone_lr": self.previous_backbone_lr}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_backbone_lr = state_dict.get("previous_backbone_lr")
        super().load_state_dict(state_dict)

    @override
    def freeze_before_training(self, module: TrainModule) -> None:
        self.freeze(module.backbone)

    @override
    def finetune_function(self, module: TrainModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        current_lr = optimizer.param_groups[0]["lr"]
        if epoch == self.unfreeze_backbone_at_epoch:
            initial = (
                self.backbone_initial_lr
                if self.backbone_initial_lr is not None
                else current_lr * self.backbone_initial_ratio_lr
            )
            self.previous_backbone_lr = initial
            self.unfreeze_and_add_param_group(
                module.backbone,
                optimizer,
                initial,
                train_bn=self.train_bn,
                initial_denom_lr=self.initial_denom_lr,
            )
            self._report(module, current_lr, initial)
        elif epoch > self.unfreeze_backbone_at_epoch and self.previous_backbone_lr is not None:
            following = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            if self.should_align and following > current_lr:
                following = current_lr
            optimizer.param_groups[-1]["lr"] = following
            self.previous_backbone_lr = following
            self._report(module, current_lr, following)

    def _report(self, module: TrainModule, current_lr: float, backbone_lr: float) -> None:
        trainer = self._trainer
        if self.verbose and (trainer is None or trainer.is_global_zero):
            log.info(
                "Current lr: %s, Backbone lr: %s",
                round(current_lr, self.rounding),
                round(backbone_lr, self.rounding),
            )
