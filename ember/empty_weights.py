"""``init_empty_weights`` / ``init_on_device``: build a model without allocating or initialising its
parameters (🤗 Accelerate's context managers, same names and arguments).

A model built under ``init_empty_weights()`` has its parameters on the meta device: shapes and dtypes,
no memory, no initialisation kernels. It is a skeleton to fill: ``model.to_empty(device=...)`` then
``model.load_state_dict(...)`` (or ``ember.Accelerator.load_state`` / a ``TrainModule``'s checkpoint),
or a strategy that materialises modules itself (FSDP, under ``Accelerator.init_module(empty_init=True)``).
``Accelerator.prepare`` refuses to place a model that still has meta parameters, naming the first one.

Example::

    with ember.init_empty_weights():
        model = MyModel()                       # no memory for the weights
    print(sum(p.numel() for p in model.parameters()))
    model.to_empty(device="cpu")
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["init_empty_weights", "init_on_device"]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Create the parameters of modules built inside on the meta device (no memory, no init).

    ``include_buffers=True`` puts buffers (BatchNorm's running statistics, ...) and every other tensor
    created inside there too; by default buffers stay where they would be (the CPU), as in Accelerate.
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


@contextlib.contextmanager
def init_on_device(device: torch.device | str, include_buffers: bool = False) -> Iterator[None]:
    """Create the parameters of modules built inside on ``device`` (each one moved as it is
    registered); ``include_buffers=True``: every tensor created inside, as ``with torch.device(device):``.
    """
    if not isinstance(include_buffers, bool):
        raise ValueError(f"include_buffers={include_buffers!r}. Valid choices: True, False")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a torch device. Valid choices: 'meta', 'cpu', 'cuda', 'cuda:1', a torch.device"
        ) from None
    if include_buffers:
        with target:
            yield
        return
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device != target:
            # The same Parameter class and attributes (sharding or quantisation libraries add some).
            moved = type(param)(param.detach().to(target), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            self._parameters[name] = moved

    # The class attribute for the duration: every module class that does not override
    # register_parameter (which torch's do not) picks it up, and it is put back on any exit.
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose parameters are still on the meta device (``prepare`` on a strategy that does
    not materialise modules): torch's own error comes later and names neither the parameter nor the way."""
    name = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if name is not None:
        raise ValueError(
            f"prepare(): parameter {name!r} of the {type(model).__name__} is on the meta device (built under "
            "init_empty_weights() or torch.device('meta')) and has no values: fill it first with "
            "model.to_empty(device=...) and load_state_dict(...), or build it under "
            "accelerator.init_module(empty_init=True) with strategy='fsdp', which materialises each shard"
        )
