"""``"16-true"`` and ``"bf16-true"``: parameters, inputs and compute all in half precision."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember.precision.base import Precision
from ember.precision.utils import convert_floating, default_dtype


class HalfPrecision(Precision):
    """Everything in ``float16`` (``"16-true"``) or ``bfloat16`` (``"bf16-true"``); no grad scaler."""

    def __init__(self, precision: str = "bf16-true", *, device_type: str = "cpu") -> None:
        super().__init__(device_type=device_type)
        if precision not in ("16-true", "bf16-true"):
            raise ValueError(
                f"precision={precision!r} is not a true half precision. Valid choices: '16-true', 'bf16-true'"
            )
        self.name = precision  # type: ignore[misc]
        self.dtype = torch.float16 if precision == "16-true" else torch.bfloat16

    @classmethod
    @override
    def register_precisions(cls, registry: Registry[Precision]) -> None:
        registry.register("16-true", cls, "float16 weights and compute", precision="16-true")
        registry.register("bf16-true", cls, "bfloat16 weights and compute", precision="bf16-true")

    @property
    @override
    def wraps_forward(self) -> bool:
        return True

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype)

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        # As Lightning's: tensors the forward creates (RNN states, masks) get the weights' dtype.
        return default_dtype(self.dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return convert_floating(data, self.dtype)
