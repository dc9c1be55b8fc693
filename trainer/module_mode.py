"""The module's train/eval mode around the evaluation and predict loops, through Lightning's hooks
``on_{validation,test,predict}_model_eval`` and ``on_{validation,test}_model_train``.

Called once per loop, not per batch. Every submodule's mode is noted before the eval hook, and put
back after the loop unless the module overrides the ``*_model_train`` hook (predict has none): a
layer frozen in eval mode (a finetuning backbone's BatchNorm) stays in eval mode after validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.trainer.hooks import overridden
from ember.trainer.profilers.timed import module_hook

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["enter_eval", "leave_eval"]


def enter_eval(trainer: Trainer, prefix: str) -> dict[str, bool]:
    """Note each submodule's mode, then ``on_{prefix}_model_eval`` (by default ``model.eval()``);
    ``prefix``: ``"validation"``, ``"test"`` or ``"predict"``. Returns the modes noted."""
    modes = {name: layer.training for name, layer in trainer.model.named_modules()}
    module_hook(trainer, f"on_{prefix}_model_eval")()
    return modes


def leave_eval(trainer: Trainer, prefix: str, modes: dict[str, bool]) -> None:
    """The module's ``on_{prefix}_model_train`` where it overrides it, else each submodule back in
    the mode :func:`enter_eval` noted (one added since keeps its own)."""
    name = f"on_{prefix}_model_train"
    if prefix != "predict" and overridden(trainer.module, name) is not None:
        module_hook(trainer, name)()
        return
    for path, layer in trainer.model.named_modules():
        if path in modes:
            layer.training = modes[path]
