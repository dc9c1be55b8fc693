"""Keeps the prepared model's wrapper in step with the parameters that require grad.

DDP registers the parameters it synchronises when it wraps the module. A callback that unfreezes
parameters during the fit (``BaseFinetuning``) changes that set; the Trainer notices it once per
training epoch, after ``on_train_epoch_start`` (where ``finetune_function`` runs), and asks the
Accelerator for a model that synchronises the new set (``Accelerator.refresh_trainable``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.trainer.module import TrainModule

__all__ = ["TrainableRefresh"]


class TrainableRefresh:
    """Mixed into :class:`~ember.trainer.Trainer`: the requires-grad flags the prepared model was
    wrapped with, and the re-wrap when they change."""

    accelerator: Accelerator
    _model: torch.nn.Module | None
    #: ``requires_grad`` of each parameter of the module when its wrapper was built
    _trainable: tuple[bool, ...] = ()

    if TYPE_CHECKING:

        @property
        def module(self) -> TrainModule: ...

    def _note_trainable(self) -> None:
        """Remember the flags the model was just prepared with (after ``prepare`` in ``fit``)."""
        self._trainable = tuple(p.requires_grad for p in self.module.parameters())

    def _refresh_trainable(self) -> None:
        """Re-wrap the model if the flags changed since it was wrapped: once per epoch, never per step."""
        flags = tuple(p.requires_grad for p in self.module.parameters())
        if flags == self._trainable or self._model is None:
            return
        # Every rank runs the same callbacks, so every rank re-wraps here (DDP's construction is a collective).
        self._model = self.accelerator.refresh_trainable(self._model)
        self._trainable = flags
