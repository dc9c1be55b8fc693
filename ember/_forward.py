"""Routing a method of the user's module (``training_step`` ...) through the prepared model's
``forward``: :meth:`ember.Accelerator.call_as_forward` (defined here, bound on the class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules import module as torch_module

from ember._plugin_args import uncompiled

if TYPE_CHECKING:
    from ember.accelerator import Accelerator


def call_as_forward(
    self: Accelerator, model: nn.Module, method: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Run ``method`` (e.g. ``module.training_step``) as the forward pass of the prepared ``model``.

    Strategy wrappers (DDP) only synchronize gradients of computations that went through their
    ``forward``, and the precision plugin's autocast wraps the forward: this routes a method of the
    user's module through both. Inside ``method``, ``self(x)`` calls the real ``forward``. A model
    ``prepare`` compiled runs uncompiled here (its forward is swapped for the call).
    """
    if self._compiles:  # (one attribute read when nothing is compiled: the Trainer's every step)
        model = uncompiled(model)
    inner = self._strategy.unwrap_module(model) if self._unwraps else model
    hooks = self._wraps_forward  # False: the precision's forward hooks do nothing (fp32), skip them
    if (
        inner is model
        and not hooks
        and not (model._forward_pre_hooks or model._forward_hooks)
        and not (model._backward_pre_hooks or model._backward_hooks)
        and not (_GLOBAL_FORWARD_PRE_HOOKS or _GLOBAL_FORWARD_HOOKS)
        and not (_GLOBAL_BACKWARD_PRE_HOOKS or _GLOBAL_BACKWARD_HOOKS)
    ):
        return method(*args, **kwargs)  # no wrapper, no autocast, no hooks: nothing to route through
    precision = self.precision
    patched = inner.__dict__.get("forward")  # the precision wrapper, if any

    def redirected(*a: Any, **kw: Any) -> Any:
        # Put the real forward back first: the method usually calls it.
        restore_forward(inner, patched)
        if not hooks:
            return method(*a, **kw)
        with precision.forward_context():
            a, kw = precision.convert_input((a, kw))
            return precision.convert_output(method(*a, **kw))

    # Into the instance dict directly: nn.Module.__setattr__ would first search parameters,
    # buffers and submodules for the name, on every step.
    inner.__dict__["forward"] = redirected
    try:
        return model(*args, **kwargs)
    finally:
        restore_forward(inner, patched)


_GLOBAL_FORWARD_PRE_HOOKS = torch_module._global_forward_pre_hooks
_GLOBAL_FORWARD_HOOKS = torch_module._global_forward_hooks
_GLOBAL_BACKWARD_PRE_HOOKS = torch_module._global_backward_pre_hooks
_GLOBAL_BACKWARD_HOOKS = torch_module._global_backward_hooks


def restore_forward(module: nn.Module, patched: Any) -> None:
    if patched is not None:
        module.__dict__["forward"] = patched
    else:
        module.__dict__.pop("forward", None)
