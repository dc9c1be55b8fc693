"""``"16-mixed"`` and ``"bf16-mixed"``: fp32 parameters, autocast compute, grad scaling for fp16."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_bool
from ember.precision.base import Precision
from ember.precision.utils import convert_floating


class MixedPrecision(Precision):
    """Automatic mixed precision via :func:`torch.autocast`.

    ``"16-mixed"`` also owns a :class:`torch.amp.GradScaler`: the loss is scaled before backward,
    gradients are unscaled before clipping and the optimizer step is skipped when they hold inf/NaN.
    ``autocast_enabled`` and ``cache_enabled`` are ``torch.autocast``'s ``enabled`` and
    ``cache_enabled`` for every forward (🤗 Accelerate's ``AutocastKwargs`` handler sets them).

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
        autocast_enabled: bool = True,
        cache_enabled: bool | None = None,
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
        check_bool("autocast_enabled", autocast_enabled, owner="MixedPrecision")
        check_bool("cache_enabled", cache_enabled, owner="MixedPrecision", optional=True)
        # torch.autocast's options for every forward (🤗 Accelerate's AutocastKwargs handler)
        self.autocast_enabled, self.cache_enabled = autocast_enabled, cache_enabled
        self.name = precision  # type: ignore[misc]
        self.dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        if scaler is not None and precision != "16-mixed":
            raise ValueError(f"a grad scaler is only used with precision='16-mixed', not {precision!r}")
        self.scaler: torch.amp.GradScaler | None = (
            (scaler or torch.amp.GradScaler(device_type)) if precision == "16-mixed" else None
        )
        # torch's recipe for several optimizers: each is unscaled once and stepped once, then one
        # update() ends the iteration. The optimizers unscaled / stepped since the last update:
        self._unscaled: set[int] = set()
        self._stepped: set[int] = set()
        self._skipped = False  # a step since the last update found inf/NaN gradients
        self._seen: weakref.WeakValueDictionary[int, torch.optim.Optimizer] = weakref.WeakValueDictionary()

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
        return torch.autocast(
            self.device_type,
            dtype=self.dtype,
            enabled=self.autocast_enabled,
            cache_enabled=self.cache_enabled,
        )

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
        if self.scaler is None:
            return
        self._begin(optimizer)
        # One without gradients yet (a GAN's second network, unscaled with the first by a clip of
        # every optimizer) is left to be unscaled after its own backward.
        if id(optimizer) not in self._unscaled and _has_gradients(optimizer):
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
        if not _has_gradients(optimizer):  # nothing to update (torch's step would leave it all), and
            return False  # the scaler, finding no gradient to check, would fail
        self._begin(optimizer)
        stepped: list[bool] = []  # the scaler skips optimizer.step() for inf/NaN gradients
        handle = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
        try:
            self.scaler.step(optimizer)
        finally:
            handle.remove()
        self._stepped.add(id(optimizer))
        self._skipped = self._skipped or not stepped
        return bool(stepped)

    @property
    @override
    def ends_iterations(self) -> bool:
        return self.scaler is not None or type(self).end_iteration is not MixedPrecision.end_iteration

    @override
    def end_iteration(self, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        if self.scaler is None or not self._stepped:  # nothing stepped since the last update
            return
        if optimizers is not None:
            pending = False
            for optimizer in optimizers:
                # Known from the first step on: one that has not stepped yet may hold gradients
                # already, which an early update (_begin) must bring to the new scale. (An id in
                # _seen is a live optimizer's: a collected one leaves it.)
                if id(optimizer) not in self._seen:
                    self._seen[id(optimizer)] = optimizer
                pending = pending or id(optimizer) not in self._stepped
            if pending:
                return
        self.scaler.update()
        self._unscaled.clear()
        self._stepped.clear()
        self._skipped = False

    def _begin(self, optimizer: torch.optim.Optimizer) -> None:
        """Before ``optimizer`` is unscaled or stepped: if it already stepped since the last update,
        a new iteration began without the last one ending (a loop where the optimizers step at
        different rates), so the scale is updated now; the gradients still scaled by the old scale
        are brought to the new one, and those unscaled but not stepped yet are scaled again."""
        self._seen[id(optimizer)] = optimizer
        if id(optimizer) not in self._stepped:
            return
        assert self.scaler is not None
        before = self.scaler.get_scale()
        waiting = [self._seen[i] for i in self._unscaled - self._stepped if i in self._seen]
        true_scale = {id(p) for opt in waiting for p in _params(opt)}
        self.end_iteration()
        after = self.scaler.get_scale()
        done: set[int] = set()
        for opt in list(self._seen.values()):
            for param in _params(opt):
                if param.grad is None or id(param) in done:
                    continue
                done.add(id(param))
                if id(param) in true_scale:
                    param.grad.mul_(after)
                elif after != before:
                    param.grad.mul_(after / before)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        if not self._stepped or not self.scaler.is_enabled():
            return dict(self.scaler.state_dict())
        # Mid-round (an optimizer stepped, another not yet): the scale as it is after the pending
        # update, which this run makes at a later step and a run resumed from here, with nothing
        # stepped, would not make. Saving leaves this run as it is.
        waiting = (self._seen[i] for i in self._unscaled - self._stepped if i in self._seen)
        found_inf = self._skipped or any(
            not bool(torch.isfinite(p.grad).all())
            for opt in waiting
            for p in _params(opt)
            if p.grad is not None
        )
        return _updated_state(self.scaler, found_inf, self.device_type)

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is None or not state:
            return
        if self._stepped:  # the pending round belongs to the state replaced: it ends unrecorded
            self.scaler.update()  # (which also clears the scaler's record of those steps)
            self._unscaled.clear()
            self._stepped.clear()
            self._skipped = False
        self.scaler.load_state_dict(state)


def _updated_state(scaler: torch.amp.GradScaler, found_inf: bool, device_type: str) -> dict[str, Any]:
    """``scaler``'s state after an ``update()`` that finds inf/NaN gradients or not; ``scaler`` is
    left as it is. The update is torch's own, made by a twin: a scaler with steps recorded since its
    last update cannot be copied, and its record of them is private."""
    twin = torch.amp.GradScaler(device_type)
    twin.load_state_dict(scaler.state_dict())
    param = torch.zeros(1, device=device_type, requires_grad=True)
    param.grad = torch.full_like(param, math.inf if found_inf else 0.0)
    twin.scale(param)  # (makes the twin's scale tensor, on this device)
    twin.unscale_(torch.optim.SGD([param], lr=0.0))  # records found_inf
    twin.update()
    return dict(twin.state_dict())


def _params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    return (p for group in optimizer.param_groups for p in group["params"])


def _has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for p in _params(optimizer))
