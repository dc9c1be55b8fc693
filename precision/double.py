"""``"64-true"``: parameters, inputs and compute in float64."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember.precision.base import Precision
from ember.precision.utils import convert_floating, default_dtype


class DoublePrecision(Precision):
    name = "64-true"

    @classmethod
    @override
    def register_precisions(cls, registry: Registry[Precision]) -> None:
        registry.register("64-true", cls, "float64 parameters and compute")

    @property
    @override
    def wraps_forward(self) -> bool:
        return True

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.double()

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(torch.float64)

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        # As Lightning's: tensors the forward creates (RNN states, masks) get the weights' dtype.
        return default_dtype(torch.float64)

    @override
    def convert_input(self, data: Any) -> Any:
        return convert_floating(data, torch.float64)
