"""``TrainModule``'s defaults of Lightning's step, batch-transfer and train/eval-mode hooks (mixins).
The Trainer runs its own, faster, code for each step hook a module leaves alone (``hooks.overridden``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ember._tree import move_to_device

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ember.trainer.trainer import Trainer

__all__ = ["BatchTransferHooks", "ModeHooks", "StepHooks"]


class StepHooks:
    """``optimizer_step``, ``optimizer_zero_grad``, ``configure_gradient_clipping`` (and
    ``clip_gradients``), ``lr_scheduler_step`` and the three batch-transfer hooks, as Lightning
    defines them; :class:`~ember.TrainModule` inherits them."""

    if TYPE_CHECKING:  # what the mixin uses of TrainModule and nn.Module

        @property
        def trainer(self) -> Trainer: ...

        def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Step ``optimizer`` (the prepared one). ``optimizer_closure`` runs ``training_step``, the
        backward pass and what precedes a step (``on_before_optimizer_step``, clipping): an override
        must call ``optimizer.step(closure=optimizer_closure)`` (or the closure itself), e.g. to
        warm the learning rate up after it."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        """Zero the gradients after a step."""
        optimizer.zero_grad()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The backward pass of the loss ``training_step`` returned (and of :meth:`manual_backward`):
        ``loss`` comes already divided by ``accumulate_grad_batches`` and scaled by the precision's
        grad scaler. Override it to call backward differently, e.g. ``loss.backward(retain_graph=True)``;
        the Trainer then calls it inside the strategy's backward (DDP's gradient sync, the scaler)."""
        loss.backward(*args, **kwargs)

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip before each step. The Trainer passes its ``gradient_clip_val`` and
        ``gradient_clip_algorithm`` as they were given (None where not set), as Lightning does."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def clip_gradients(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients of ``optimizer``'s parameters, as Lightning's (unscaled first under
        ``16-mixed``). Either argument None: the Trainer's setting, as in Lightning (no value
        anywhere: nothing to clip). ``gradient_clip_algorithm``: ``"norm"`` (the default) or
        ``"value"``, in any case. A value or algorithm that differs from the Trainer's own (set)
        one raises ``ValueError``: use one of them."""
        if isinstance(gradient_clip_algorithm, str):
            gradient_clip_algorithm = gradient_clip_algorithm.lower()
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(
                f"clip_gradients(gradient_clip_algorithm={gradient_clip_algorithm!r}): valid choices are "
                "'norm', 'value'"
            )
        config = self.trainer.config
        for name, given, own in (
            ("gradient_clip_val", gradient_clip_val, config.gradient_clip_val),
            ("gradient_clip_algorithm", gradient_clip_algorithm, config.gradient_clip_algorithm),
        ):
            if given is not None and own is not None and given != own:
                raise ValueError(
                    f"Trainer({name}={own!r}) and clip_gradients({name}={given!r}) differ: set it in one "
                    "place only"
                )
        if gradient_clip_val is None:
            gradient_clip_val = config.gradient_clip_val
        algorithm = gradient_clip_algorithm or config.gradient_clip_algorithm or "norm"
        if not gradient_clip_val:
            return
        accelerator = self.trainer.accelerator
        inner = getattr(optimizer, "optimizer", optimizer)
        # Only this optimizer's parameters, unscaled (16-mixed) alone: with several (manual
        # optimization), the others' gradients are not its to clip, nor part of its norm, and one
        # unscaled now would be unscaled again at its own step, after the scaler's update.
        if inner is None:
            params, chosen = list(cast(nn.Module, self).parameters()), None
        else:
            params, chosen = [p for group in inner.param_groups for p in group["params"]], [inner]
        if algorithm == "norm":
            accelerator._clip_norm(params, chosen, gradient_clip_val)
        else:
            accelerator._clip_value(params, chosen, gradient_clip_val)

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """Step one LR scheduler at its interval; ``metric``: the monitored value (ReduceLROnPlateau).
        Override it to drive a scheduler that is not torch's (timm's take ``step(epoch)``)."""
        scheduler.step() if metric is None else scheduler.step(metric)


class BatchTransferHooks:
    """Lightning's batch-transfer hooks, of a TrainModule and of a DataModule (one the DataModule
    overrides runs in place of the module's)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch as the DataLoader made it, before it moves to the device; returns the batch to move."""
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move ``batch`` to ``device``: every tensor in tuples, lists, dicts and dataclasses, and every
        other object with a ``to`` method (``obj.to(device)``), as Lightning's."""
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch on the device, before the batch hooks and the step see it; returns the batch to use."""
        return batch


class ModeHooks:
    """The hooks that switch the module to eval mode before an evaluation loop and back after it, as
    Lightning defines them; :class:`~ember.TrainModule` inherits them. Override one to keep, say,
    dropout on during validation (Monte Carlo dropout)."""

    if TYPE_CHECKING:

        @property
        def trainer(self) -> Trainer: ...

    def on_validation_model_zero_grad(self) -> None:
        """Before a validation run inside a fit, at a step boundary: release the gradients (Lightning's
        hook; the memory is then free while validation runs)."""
        cast(nn.Module, self).zero_grad()

    def on_validation_model_eval(self) -> None:
        """Before ``on_validation_start``: put the model in eval mode."""
        self.trainer.model.eval()

    def on_validation_model_train(self) -> None:
        """After ``on_validation_end``, when overridden: the Trainer then calls it in place of putting
        every submodule back in the mode it had before the loop."""
        self.trainer.model.train()

    def on_test_model_eval(self) -> None:
        """Before ``on_test_start``: put the model in eval mode."""
        self.trainer.model.eval()

    def on_test_model_train(self) -> None:
        """After ``on_test_end``, when overridden (see :meth:`on_validation_model_train`)."""
        self.trainer.model.train()

    def on_predict_model_eval(self) -> None:
        """Before ``on_predict_start``: put the model in eval mode (after ``on_predict_end`` every
        submodule goes back to the mode it had)."""
        self.trainer.model.eval()
