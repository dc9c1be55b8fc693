"""``WeightAveraging`` and ``EMAWeightAveraging``: keep a running average of the weights (an EMA, or
any ``torch.optim.swa_utils.AveragedModel`` average) beside training; validate, checkpoint and finish
with it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typing_extensions import override

from ember._validation import check_bool, check_int, check_number, show
from ember.callbacks.base import Callback
from ember.callbacks.swa import copy_saved_average

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["EMAWeightAveraging", "WeightAveraging"]

_AVERAGING = ("avg_fn", "multi_avg_fn")  # AveragedModel's keywords besides device and use_buffers


def _check_device(owner: str, device: Any) -> torch.device | int | None:
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str):
        with contextlib.suppress(RuntimeError):
            return torch.device(device)
    raise ValueError(
        f"{owner}(device={show(device)}) is not valid: give a torch.device, a device string such as 'cpu' or "
        "'cuda:0', a device index, or None (the module's device)"
    )


class _Live:
    """The module's parameters and buffers as they are at each call (what ``update_parameters`` reads:
    a module moved or re-wrapped after the average was built is still the one averaged)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def buffers(self) -> Iterator[torch.Tensor]:
        return self.module.buffers()


class _Copy(nn.Module):
    """A copy of a module's parameters and buffers alone (not the module, its trainer, its data)."""

    def __init__(self, module: nn.Module, device: torch.device | int | None) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(p.detach().to(device, copy=True), requires_grad=False) for p in module.parameters()
        )
        for i, buffer in enumerate(module.buffers()):
            self.register_buffer(f"buffer_{i}", buffer.detach().to(device, copy=True))


class WeightAveraging(Callback):
    """An average of the weights, updated after the optimizer steps :meth:`should_update` picks
    (by default every one), as Lightning's callback of the same name.

    The average is a ``torch.optim.swa_utils.AveragedModel``; ``avg_fn`` or ``multi_avg_fn`` (its
    keywords) say how it averages, the equal-weight mean by default. ``use_buffers``: buffers
    (BatchNorm statistics) are averaged too; ``False`` copies them as they are. ``device``: where the
    average lives (``None``: with the weights). During validation in a fit the module holds the
    average; at the end of training the average is copied into the module. A checkpoint stores the
    average as the model's weights (so ``load_from_checkpoint``, ``test(ckpt_path=...)`` and
    ``predict`` use it) and the training weights in this callback's state, so a resumed fit goes on
    bit for bit. Before the first update the average is empty: validation, checkpoints and the end of
    training use the training weights. One process's copy of the weights is averaged: a sharded
    strategy (FSDP, DeepSpeed) is refused.

    Example::

        class EveryTenSteps(WeightAveraging):
            def should_update(self, step_idx=None, epoch_idx=None):
                return step_idx is not None and step_idx % 10 == 0
    """

    def __init__(
        self, device: torch.device | str | int | None = None, use_buffers: bool = True, **kwargs: Any
    ) -> None:
        owner = type(self).__name__
        self._device = _check_device(owner, device)
        check_bool("use_buffers", use_buffers, owner=owner)
        for name, value in kwargs.items():
            if name not in _AVERAGING:
                raise TypeError(
                    f"{owner}() got an unexpected keyword argument {name!r}: valid choices are "
                    f"{', '.join(map(repr, ('device', 'use_buffers', *_AVERAGING)))}"
                )
            if value is not None and not callable(value):
                raise TypeError(f"{owner}({name}={show(value)}) must be a function or None")
        self._use_buffers = use_buffers
        self._kwargs = kwargs
        self._average: AveragedModel | None = None
        self._names: list[str] = []
        self._fitting = self._swapped = False
        self._restored: dict[str, Any] | None = None
        # Optimizer steps and epochs done at the last update: at most one update each.
        self._latest_update_step, self._latest_update_epoch = 0, -1

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update the average after optimizer step ``step_idx`` (counted from 0) or at
        the end of epoch ``epoch_idx`` (one of the two is given). Default: after every step."""
        return step_idx is not None

    @property
    def n_averaged(self) -> int:
        """How many updates the average holds."""
        return 0 if self._average is None else int(self._average.n_averaged)

    # -- hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._fitting = False  # (a fit that crashed never reached on_fit_end)
        if stage != "fit":
            return
        if not trainer.strategy.supports_weight_averaging:
            raise ValueError(
                f"{type(self).__name__} keeps a full copy of the weights on every process, which the "
                f"{trainer.strategy.strategy_name!r} strategy does not hold (sharded parameters, or an engine "
                "that owns the step): use DDP or a single device (Strategy.supports_weight_averaging)"
            )
        self._average, self._restored = None, None  # a new fit starts afresh, or from its checkpoint
        self._latest_update_step, self._latest_update_epoch = 0, -1

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._fitting = True
        if self._average is None:  # (a resumed fit built it when its checkpoint loaded)
            self._build(module)

    @override
    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._fitting = False

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            self._update(module)
            self._latest_update_step = step

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        epoch = trainer.current_epoch
        if epoch > self._latest_update_epoch and self.should_update(epoch_idx=epoch):
            self._update(module)
            self._latest_update_epoch = epoch

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._average is not None and self.n_averaged > 0:
            with torch.no_grad():
                for averaged, current in zip(self._tensors(), self._module_tensors(module), strict=True):
                    current.copy_(averaged)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._fitting and self.n_averaged > 0:
            self._swap(module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._swapped:
            self._swap(module)

    # -- checkpoints ------------------------------------------------------------------------------
    @override
    def checkpoint_weights(
        self, trainer: Trainer, module: TrainModule
    ) -> contextlib.AbstractContextManager[None]:
        """The checkpoint stores the average as the model's weights (while it is saved, the module
        holds the average and this callback the training weights)."""
        if self._swapped or self.n_averaged == 0:  # (validation swapped already, or nothing averaged)
            return contextlib.nullcontext()
        return self._swapped_for_saving(module)

    @contextlib.contextmanager
    def _swapped_for_saving(self, module: TrainModule) -> Iterator[None]:
        self._swap(module)
        try:
            yield
        finally:
            self._swap(module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # "held": the weights this callback holds, named as the module's: the training weights while
        # a checkpoint holds the average as the model's (``weights_averaged``), else the average.
        state: dict[str, Any] = {"latest_update_step": self._latest_update_step, "n_averaged": self.n_averaged,
                                 "latest_update_epoch": self._latest_update_epoch,
                                 "weights_averaged": self._swapped}  # fmt: skip
        if self.n_averaged > 0:
            state["held"] = dict(zip(self._names, (t.detach() for t in self._tensors()), strict=True))
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied once the checkpoint's weights are in the module

    @override
    def on_load_checkpoint(self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]) -> None:
        restored, self._restored = self._restored, None
        if restored is None:
            return
        self._latest_update_step = int(restored["latest_update_step"])
        self._latest_update_epoch = int(restored["latest_update_epoch"])
        self._build(module)
        assert self._average is not None
        if int(restored["n_averaged"]) == 0:
            return
        copy_saved_average(type(self).__name__, "", restored["held"], self._names, self._tensors())
        self._average.n_averaged.fill_(int(restored["n_averaged"]))
        if restored["weights_averaged"]:  # the module loaded the average: exchange the two
            self._swap(module)
            self._swapped = False

    # -- internals --------------------------------------------------------------------------------
    def _build(self, module: TrainModule) -> None:
        device = self._device
        if device is None:
            device = next(module.parameters(), torch.empty(0)).device
        named = [*module.named_parameters(), *module.named_buffers()]
        self._names = [name for name, _ in named]
        self._average = AveragedModel(_Copy(module, device), device=device, use_buffers=self._use_buffers,
                                      **self._kwargs)  # fmt: skip
        self._swapped = False

    def _update(self, module: TrainModule) -> None:
        assert self._average is not None and not self._swapped
        self._average.update_parameters(cast(nn.Module, _Live(module)))

    def _tensors(self) -> list[torch.Tensor]:
        assert self._average is not None
        return [*self._average.module.parameters(), *self._average.module.buffers()]

    @staticmethod
    def _module_tensors(module: TrainModule) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _swap(self, module: TrainModule) -> None:
        """Exchange the module's weights and the ones this callback holds."""
        with torch.no_grad():
            for mine, theirs in zip(self._tensors(), self._module_tensors(module), strict=True):
                kept = mine.clone()
                mine.copy_(theirs)
                theirs.copy_(kept)
        self._swapped = not self._swapped


class EMAWeightAveraging(WeightAveraging):
    """An exponential moving average of the weights: ``average = decay * average + (1 - decay) *
    weights`` after every ``update_every_n_steps``-th optimizer step from ``update_starting_at_step``
    on (counted from 0; 0 steps: never after a step), and at the end of every epoch from
    ``update_starting_at_epoch`` on, when given. As Lightning's callback of the same name.

    Example::

        Trainer(callbacks=[EMAWeightAveraging(decay=0.999, update_starting_at_step=1000)])
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        check_number("decay", decay, minimum=0, owner=owner)
        if decay > 1:
            raise ValueError(f"{owner}(decay={decay!r}) must be a number in [0, 1]")
        check_int("update_every_n_steps", update_every_n_steps, minimum=0, owner=owner)
        check_int("update_starting_at_step", update_starting_at_step, minimum=0, owner=owner, optional=True)
        check_int("update_starting_at_epoch", update_starting_at_epoch, minimum=0, owner=owner, optional=True)
        for name in _AVERAGING:
            if name in kwargs:
                raise TypeError(
                    f"{owner}({name}=...) is not valid: the average is the EMA of decay={decay!r}"
                )
        averaging: Callable[..., None] = get_ema_multi_avg_fn(decay)
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=averaging, **kwargs)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            n = self.update_every_n_steps
            if started and n > 0 and step_idx % n == 0:
                return True
        start_epoch = self.update_starting_at_epoch
        return epoch_idx is not None and start_epoch is not None and epoch_idx >= start_epoch
