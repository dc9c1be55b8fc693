"""The precision plugin interface. The base class *is* ``"32-true"``: every hook does nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from ember._registry import Registry

__all__ = ["PRECISION_REGISTRY", "Precision", "resolve_precision"]

PRECISION_REGISTRY: Registry[Precision] = Registry("precision", "precision")

# Short spellings Lightning and 🤗 Accelerate users type; each maps to one registered name.
_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed", "half": "16-true",
            "fp16": "16-mixed", "no": "32-true"}  # fmt: skip  # (the last two: 🤗 Accelerate's)


class Precision:
    """Full fp32 training. Subclasses override only the hooks they need.

    Order of the hooks on one step (the Accelerator calls them through the strategy)::

        convert_input(batch) -> with forward_context(): module(batch) -> convert_output(out)
        pre_backward(loss) -> backward(loss) -> post_backward(loss)
        [unscale_gradients(optimizer) -> clip] -> optimizer_step(optimizer)
        ... the iteration's other optimizers ... -> end_iteration()
    """

    name: ClassVar[str] = "32-true"
    #: The ``torch.amp.GradScaler`` that scales the loss (``16-mixed``); None: no loss scaling.
    scaler: torch.amp.GradScaler | None = None

    def __init__(self, *, device_type: str = "cpu") -> None:
        self.device_type = device_type

    @classmethod
    def register_precisions(cls, registry: Registry[Precision]) -> None:
        registry.register("32-true", cls, "full fp32 parameters and compute")

    # -- modules and data -----------------------------------------------------------------------
    @property
    def wraps_forward(self) -> bool:
        """True when prepared models must route forward through the input/forward/output hooks."""
        return False

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module

    def module_init_context(self) -> AbstractContextManager[Any]:
        """Context for building a module directly in this precision's parameter dtype."""
        return nullcontext()

    def forward_context(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def autocast_context(self, *, enabled: bool, cache_enabled: bool | None) -> AbstractContextManager[Any]:
        """:meth:`forward_context` with ``torch.autocast``'s ``enabled`` and ``cache_enabled`` (🤗
        Accelerate's ``AutocastKwargs``): a precision that does not autocast has nothing to change."""
        return self.forward_context()

    def convert_input(self, data: Any) -> Any:
        return data

    def convert_output(self, data: Any) -> Any:
        return data

    # -- backward and optimizer ------------------------------------------------------------------
    def pre_backward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def backward(
        self, tensor: torch.Tensor, *args: Any, backward_fn: Callable[..., Any] | None = None, **kwargs: Any
    ) -> None:
        """``tensor.backward(*args, **kwargs)``; with ``backward_fn``, ``backward_fn(tensor, *args,
        **kwargs)`` in its place (the Trainer passes a ``TrainModule``'s own ``backward``)."""
        if backward_fn is not None:
            backward_fn(tensor, *args, **kwargs)
        else:
            tensor.backward(*args, **kwargs)

    def post_backward(self, tensor: torch.Tensor) -> None:
        return None

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before clipping (a no-op without a grad scaler)."""
        return None

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        """Step ``optimizer``; return False when the step was skipped (e.g. inf gradients)."""
        optimizer.step(closure) if closure is not None else optimizer.step()
        return True

    @property
    def ends_iterations(self) -> bool:
        """False when :meth:`end_iteration` does nothing (no grad scaler): a prepared optimizer then
        leaves the call out of its steps (it asks once, when prepared)."""
        return type(self).end_iteration is not Precision.end_iteration

    def end_iteration(self, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        """The optimizers of one iteration have stepped: a grad scaler updates its loss scale, once
        an iteration (torch's recipe for several optimizers). ``optimizers``: only once each of them
        has stepped since the last update; None: now. A no-op without a grad scaler."""
        return None

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def resolve_precision(value: str | int | Precision, *, device_type: str) -> Precision:
    """Turn ``precision=`` (a name, an alias such as ``16`` or ``"bf16"``, or a plugin) into a plugin."""
    if isinstance(value, Precision):
        given = getattr(value, "device_type", device_type)
        if given != device_type and {given, device_type} <= {"cpu", "cuda"}:  # it would cast the wrong device
            raise ValueError(
                f"precision={type(value).__name__}({value.name!r}, device_type={given!r}): this run's device is "
                f"{device_type!r}; make the plugin with device_type={device_type!r} (or pass precision={value.name!r})"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(
            f"precision={value!r} must be a name ({', '.join(PRECISION_REGISTRY.names())}) "
            "or an ember.precision.Precision instance"
        )
    name = precision_name(value)
    PRECISION_REGISTRY.check(name)
    return PRECISION_REGISTRY.create(name, device_type=device_type)


def precision_name(value: str | int | Precision) -> str:
    """The name ``precision=`` stands for: an alias (``16``, ``"bf16"``) resolved, a plugin's own name."""
    return value.name if isinstance(value, Precision) else _ALIASES.get(str(value), str(value))
