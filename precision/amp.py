"""``"16-mixed"`` and ``"bf16-mixed"``: fp32 parameters, autocast compute, grad scaling for fp16."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from typing_extensions import override

from ember._registry import Registry
from ember.precision.base import Precision
from ember.precision.utils import convert_floating


class MixedPrecision(Precision):
    """Automatic mixed precision via :func:`torch.autocast`.

    ``"16-mixed"`` also owns a :class:`torch.amp.GradScaler`: the loss is scaled before backward,
    gradients are unscaled before clipping and the optimizer step is skipped when they hold inf/NaN.

    Example::

        accelerator = Accelerator(precision="bf16-mixed")
    """

    def __init__(
        self,
        precision: str = "bf16-mixed",
        device_type: str = "cpu",  # (positional too: Lightning's MixedPrecision(precision, device))
        scaler: torch.amp.GradScaler | None = None,
        *,
        device: str | None = None,
    ) -> None:
        if device is not None:  # Lightning's keyword: MixedPrecision(precision=..., device="cuda")
            if device_type not in ("cpu", device):
                raise ValueError(
                    f"MixedPrecision(device_type={device_type!r}, device={device!r}): give one of the two"
                )
            device_type = device
        super().__init__(device_type=device_type)
        if precision not in ("16-mixed", "bf16-mixed"):
            raise ValueError(
                f"precision={precision!r} is not a mixed precision. Valid choices: '16-mixed', 'bf16-mixed'"
            )
        self.name = precision  # type: ignore[misc]
        self.dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        if scaler is not None and precision != "16-mixed":
            raise ValueError(f"a grad scaler is only used with precision='16-mixed', not {precision!r}")
        self.scaler: torch.amp.GradScaler | None = (
            (scaler or torch.amp.GradScaler(device_type)) if precision == "16-mixed" else None
        )
        # GradScaler refuses a second unscale_ of one optimizer within a step; remember which we did.
        self._unscaled: set[int] = set()

    @classmethod
    @override
    def register_precisions(cls, registry: Registry[Precision]) -> None:
        registry.register(
            "16-mixed", cls, "fp32 weights, float16 autocast, grad scaler", precision="16-mixed"
        )
        registry.register("bf16-mixed", cls, "fp32 weights, bfloat16 autocast", precision="bf16-mixed")

    @property
    @override
    def wraps_forward(self) -> bool:
        return True

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype)

    @override
    def autocast_context(self, *, enabled: bool, cache_enabled: bool | None) -> AbstractContextManager[Any]:
        # enabled=False turns autocast off inside the block, even within an enclosing autocast.
        return torch.autocast(
            self.device_type, dtype=self.dtype, enabled=enabled, cache_enabled=cache_enabled
        )

    @override
    def convert_output(self, data: Any) -> Any:
        # Outputs leave autocast in fp32 so losses and metrics computed outside are full precision.
        return convert_floating(data, torch.float32)

    @override
    def pre_backward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(tensor) if self.scaler is not None else tensor

    @override
    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    @override
    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        if self.scaler is None:
            return super().optimizer_step(optimizer, closure)
        if closure is not None:
            raise ValueError("precision='16-mixed' does not support optimizer closures (e.g. LBFGS)")
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() forgets every optimizer's unscaling, so forget ours too: one unscaled for this step
        # but stepped later (a GAN's second optimizer) is unscaled again after its own backward.
        self._unscaled.clear()
        # The scaler lowers its scale exactly when it skipped the step for inf/NaN gradients.
        return self.scaler.get_scale() >= scale_before

    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict()) if self.scaler is not None else {}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
