"""``NonFiniteGuard``: stop, or skip the step, when the loss or a gradient becomes NaN or Inf."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember.callbacks.base import Callback
from ember.strategies.capabilities import OwnsOptimizerStep

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["NonFiniteGuard"]

log = logging.getLogger("ember")
_MODES = ("stop", "skip")
_MAX_RANKS = 1 << 20  # ranks encoded beside a step in one int64 (see _raise_for_pending)


class NonFiniteGuard(Callback):
    """Check the loss and the gradients of optimizer steps for NaN/Inf, right before the step.

    ``mode="stop"`` raises :class:`FloatingPointError` naming the step and the loss or the first
    parameter (in the optimizer's order) whose gradient is not finite. ``mode="skip"`` drops that
    step's gradients (``grad = None``, which every torch optimizer skips: no update, no weight decay,
    no momentum change) and training goes on; ``skipped_steps`` counts them.

    Cost of a checked step: one pass over the gradients (``torch._foreach_norm``, the memory traffic
    of norm clipping) summed into one number with the losses, a one-number all-reduce so every rank
    takes the same decision, and one device-to-host sync; only when that number is not finite is
    each parameter looked at, to name the first bad one. ``check_every_n_steps=N`` checks every
    N-th step. ``None``: every step with ``mode="skip"`` (a step can only be skipped before it is
    taken); with ``mode="stop"``, every ``log_every_n_steps``-th step of the Trainer, and the loss
    of each step in between is kept on the device and checked then (on the CPU, where reading it
    waits for nothing, it is read at once and only a non-finite one is kept), before any
    checkpoint is saved and at the end of training: a NaN loss is still reported with its step, no checkpoint
    is written after it, and the steps in between cost no pass and no sync. On an XLA device
    ``None`` checks nothing: reading the result on the host would end the step's lazy graph early
    (a second graph, compiled once, runs on each checked step), so it takes an explicit
    ``check_every_n_steps`` there.

    Gradients are left alone where another mechanism owns them: under ``precision="16-mixed"`` the
    grad scaler already skips steps with Inf/NaN gradients (and lowers its scale), and DeepSpeed's
    engine keeps the gradients and steps inside ``backward``; there only the loss is checked, and
    ``mode="skip"`` is refused for DeepSpeed.

    Example::

        Trainer(callbacks=[NonFiniteGuard(mode="skip", check_every_n_steps=10)])
        Trainer(non_finite="skip")  # the same guard with the default check interval
    """

    def __init__(self, mode: str = "stop", check_every_n_steps: int | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"NonFiniteGuard(mode={mode!r}): valid choices are 'stop', 'skip'")
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool)
            or not isinstance(check_every_n_steps, int)
            or check_every_n_steps < 1
        ):
            raise ValueError(
                f"NonFiniteGuard(check_every_n_steps={check_every_n_steps!r}) must be None or an int >= 1"
            )
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self.skipped_steps = 0
        self._every = check_every_n_steps or 1  # 0: no step is checked
        self._losses: list[torch.Tensor] = []
        # mode="stop": the losses of the steps between checks, with (step, epoch, batch), checked later
        # (a bad loss of a CPU run is kept as its float: see on_before_backward)
        self._pending: list[tuple[tuple[int, int, int], torch.Tensor | float]] = []
        self._names: dict[int, str] = {}
        self._plan_key: tuple[int, ...] = ()
        self._plan: list[tuple[torch.dtype, list[int], torch.Tensor]] = []
        self._on_device = True
        self._grads_checked = True
        self._device: torch.device | None = None  # the accelerator's, from on_train_start
        self._host = False

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and self.mode == "skip" and isinstance(trainer.strategy, OwnsOptimizerStep):
            raise ValueError(
                f"NonFiniteGuard(mode='skip') cannot skip steps under strategy={trainer.strategy.strategy_name!r}: "
                "its engine applies the optimizer step inside backward. Use mode='stop'"
            )

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self.check_every_n_steps is None:
            interval = 1 if self.mode == "skip" else trainer.log_every_n_steps
            self._every = 0 if trainer.accelerator.device.type == "xla" else interval
        # After prepare: the parameters the optimizers hold now (FSDP replaced them by shards).
        self._names = {id(p): name for name, p in module.named_parameters()}
        self._losses.clear()
        self._pending.clear()
        self._grads_checked = self._checks_gradients(trainer)
        self._device = trainer.accelerator.device
        # A loss in host memory is read at once (no device to wait for): nothing is kept per step.
        self._host = self._device.type == "cpu"

    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        # No step is checked (XLA, unless check_every_n_steps asks): the per-step hooks only return.
        if self._every or type(self) is not NonFiniteGuard:
            return frozenset()
        return frozenset({"on_before_backward", "on_before_optimizer_step"})

    @override
    def on_before_backward(self, trainer: Trainer, module: TrainModule, loss: torch.Tensor) -> None:
        every = self._every
        if not every:
            return
        state = trainer.state
        if state.global_step % every == 0:
            # The detached loss is the one self.log and on_train_batch_end get: one detach per batch.
            self._losses.append(trainer._metrics.detached(loss))
        elif self.mode == "stop":  # checked at the next checked step, checkpoint or the end
            if self._host:  # read now, which waits for nothing: only a bad loss is kept, as a float
                value = loss.item() if loss.dim() == 0 else float(loss.detach().float().sum())
                if not math.isfinite(value):
                    self._pending.append(((state.global_step, state.epoch, state.batch_idx), value))
            else:  # kept on the device (a read would wait for it), all checked together later
                kept = trainer._metrics.detached(loss)
                self._pending.append(((state.global_step, state.epoch, state.batch_idx), kept))

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses = self._losses
        if losses:
            self._losses = []
        every = self._every
        if not every or trainer.state.global_step % every != 0:
            return
        pending, self._pending = self._pending, []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._all_finite(trainer, params, [*losses, *(loss for _, loss in pending)]):
            return
        self._raise_for_pending(trainer, pending)
        first_bad, loss_rank = self._find(trainer, params, losses)
        if first_bad < 0 and loss_rank < 0:
            return
        problem = _describe(params, first_bad, loss_rank, self._names)
        where = _where(trainer.global_step, trainer.current_epoch, trainer.state.batch_idx)
        if self.mode == "stop":
            raise FloatingPointError(
                f"NonFiniteGuard: {problem} at {where}. Lower the learning rate, clip gradients, look for a "
                "bad batch, or pass NonFiniteGuard(mode='skip') / Trainer(non_finite='skip') to skip such steps"
            )
        for param in params:  # optimizers skip parameters without a gradient
            param.grad = None
        self.skipped_steps += 1
        if trainer.is_global_zero:
            log.warning("NonFiniteGuard: %s at %s; skipped this optimizer step", problem, where)

    @override
    def on_save_checkpoint(self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]) -> None:
        self._check_pending(trainer)  # a checkpoint is never written after a non-finite loss

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._check_pending(trainer)

    def _check_pending(self, trainer: Trainer) -> None:
        """Check the losses kept since the last checked step (on every rank: it may all-reduce)."""
        if not self._every or self.mode != "stop":
            return
        pending, self._pending = self._pending, []
        if (pending or trainer.world_size > 1) and not self._all_finite(
            trainer, [], [loss for _, loss in pending]
        ):
            self._raise_for_pending(trainer, pending)

    def _raise_for_pending(
        self, trainer: Trainer, pending: list[tuple[tuple[int, int, int], torch.Tensor | float]]
    ) -> None:
        """Raise for the earliest kept loss that is not finite on any rank; return if there is none.

        Each rank encodes its earliest bad step and its rank in one integer that is larger for an
        earlier step, so that one max all-reduce finds the earliest over all ranks."""
        if self.mode != "stop":
            return
        device = trainer.accelerator.device
        code = torch.zeros((), dtype=torch.int64, device=device)  # 0: none
        if pending:
            losses = _as_tensors([loss for _, loss in pending], device)
            finite = torch.isfinite(torch.stack([loss.float().sum().to(device) for loss in losses]))
            bad = (~finite).nonzero()  # one sync, on the failure path only
            if len(bad):
                step = pending[int(bad[0])][0][0]
                code.fill_(((1 << 40) - step) * _MAX_RANKS + trainer.global_rank)
        if trainer.world_size > 1:
            code = trainer.accelerator.reduce(code, "max")
        value = int(code.item())
        if not value:
            return
        step, rank = (1 << 40) - value // _MAX_RANKS, value % _MAX_RANKS
        where = next((w for w, _ in pending if w[0] == step), (step, -1, -1))
        if trainer.world_size > 1:  # the rank that kept it tells the others its epoch and batch
            place = torch.tensor(where[1:], dtype=torch.int64, device=device)
            epoch, batch = (int(v) for v in trainer.accelerator.reduce(place, "max").tolist())
            where = (step, epoch, batch)
        raise FloatingPointError(
            f"NonFiniteGuard: the loss is not finite (on rank {rank}) at {_where(*where)}, found at the check of "
            f"step {trainer.global_step}. Lower the learning rate, clip gradients, look for a bad batch, or "
            "check every step to also name the parameter: NonFiniteGuard(check_every_n_steps=1)"
        )

    def _all_finite(
        self, trainer: Trainer, params: list[torch.Tensor], losses: Sequence[torch.Tensor | float]
    ) -> bool:
        """Whether the losses and gradients are finite on every rank, with one device-to-host sync.

        One ``_foreach_norm`` per dtype over the gradients and the losses (as :meth:`_bad_gradients`
        computes them) gives one number per tensor: a NaN or an Inf in a tensor makes its number
        non-finite. One process reads them all at once; several sum them and all-reduce the sum,
        which may overflow to a false alarm. On False, :meth:`_find` looks at each value and decides.
        """
        device = self._device or trainer.accelerator.device
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for loss in _as_tensors(losses, device):
            by_dtype.setdefault(loss.dtype, []).append(loss if loss.device == device else loss.to(device))
        for dtype, same in by_dtype.items():  # one tensor per dtype: a norm each, not one per step's loss
            scalars = all(loss.dim() == 0 for loss in same)
            groups[dtype] = [torch.stack(same) if scalars else torch.cat([loss.reshape(-1) for loss in same])]
        if params and self._grads_checked:
            self._update_plan(params, device)
            for dtype, positions, _ in self._plan:
                group = groups.setdefault(dtype, [])
                group += [_local(g) for i in positions if (g := params[i].grad) is not None]
        several = trainer.world_size > 1
        checks = []
        for dtype, tensors in groups.items():
            if not tensors:
                continue
            low = dtype in (torch.float16, torch.bfloat16)  # summed in float32, as in _bad_gradients
            norms = (
                torch._foreach_norm(tensors, 2, dtype=torch.float32)
                if low
                else torch._foreach_norm(tensors, 2)
            )
            if not self._on_device:  # e.g. some gradients offloaded to the CPU
                norms = tuple(n.to(device) for n in norms)
            stacked = torch.stack(norms)
            checks.append(stacked.sum().double() if several else stacked)
        if several:  # sharded gradients and per-rank losses: every rank must agree
            total = (
                torch.stack(checks).sum() if checks else torch.zeros((), dtype=torch.float64, device=device)
            )
            return math.isfinite(trainer.accelerator.reduce(total, "sum").item())
        return all(bool(torch.isfinite(check).all()) for check in checks)  # one sync per dtype

    def _find(
        self, trainer: Trainer, params: list[torch.Tensor], losses: list[torch.Tensor]
    ) -> tuple[int, int]:
        """(index of the first parameter with a non-finite gradient, rank with a non-finite loss), -1
        for none, agreed by every rank, with one device-to-host sync."""
        device = trainer.accelerator.device
        first = torch.zeros((), dtype=torch.int64, device=device)  # len(params) - index, 0: none
        if params and self._grads_checked:
            bad = self._bad_gradients(params, device)
            first = torch.where(bad.any(), len(params) - bad.int().argmax(), 0)
        loss_rank = torch.zeros((), dtype=torch.int64, device=device)  # rank + 1, 0: none
        if losses:
            finite = torch.isfinite(torch.stack([loss.float().sum().to(device) for loss in losses])).all()
            loss_rank = torch.where(finite, 0, trainer.global_rank + 1)
        summary = torch.stack([first, loss_rank])
        if trainer.world_size > 1:  # sharded gradients and per-rank losses: every rank must agree
            summary = trainer.accelerator.reduce(summary, "max")
        worst_first, worst_rank = (int(v) for v in summary.tolist())
        return (len(params) - worst_first if worst_first else -1), worst_rank - 1

    def _bad_gradients(self, params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """One flag per parameter, on ``device``: its gradient holds a NaN or an Inf (no sync).

        Parameters are checked by dtype, one ``_foreach_norm`` (2-norm, in float32 for float16 and
        bfloat16) each. A norm is not finite when an element is not, or when the elements are so
        large (about 1e19 in float32, 1e154 in float64) that the sum of their squares overflows:
        a diverged step too. A parameter without a gradient counts as finite; a shard is checked
        where it lives.
        """
        self._update_plan(params, device)
        bad = torch.zeros(len(params), dtype=torch.bool, device=device)
        for dtype, positions, index in self._plan:
            zero = torch.zeros((), dtype=dtype, device=device)
            grads = [zero if (g := params[i].grad) is None else _local(g) for i in positions]
            low = dtype in (torch.float16, torch.bfloat16)  # summed in float32: float16 cannot overflow
            norms = (
                torch._foreach_norm(grads, 2, dtype=torch.float32) if low else torch._foreach_norm(grads, 2)
            )
            if len({n.device for n in norms}) > 1:  # e.g. some gradients offloaded to the CPU
                norms = tuple(n.to(device) for n in norms)
            bad[index] = ~torch.isfinite(torch.stack(norms)).to(device)
        return bad

    def _update_plan(self, params: list[torch.Tensor], device: torch.device) -> None:
        """The positions of the parameters per dtype (and as index tensors), made once per list."""
        key = tuple(id(p) for p in params)
        if self._plan_key != key:
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, param in enumerate(params):
                by_dtype.setdefault(param.dtype, []).append(i)
            self._plan = [(dtype, pos, torch.tensor(pos, device=device)) for dtype, pos in by_dtype.items()]
            self._plan_key = key
            # Gradients live on their parameter's device: on ``device``, their norms need no copy.
            self._on_device = all(p.device == device for p in params)

    def _checks_gradients(self, trainer: Trainer) -> bool:
        scaler = getattr(trainer.precision, "scaler", None)  # 16-mixed: the scaler skips Inf steps itself
        return scaler is None and not isinstance(trainer.strategy, OwnsOptimizerStep)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def _where(step: int, epoch: int, batch: int) -> str:
    return f"step {step} (epoch {epoch}, batch {batch})" if epoch >= 0 else f"step {step}"


def _describe(params: list[torch.Tensor], first_bad: int, loss_rank: int, names: dict[int, str]) -> str:
    parts = []
    if loss_rank >= 0:
        parts.append(f"the loss is not finite (on rank {loss_rank})")
    if first_bad >= 0:
        param = params[first_bad]
        name = names.get(id(param), f"#{first_bad} of the optimizer's parameters")
        parts.append(f"the gradient of parameter {name!r} {_kind(param.grad)}")
    return " and ".join(parts)


def _kind(grad: torch.Tensor | None) -> str:
    """What this rank sees in ``grad`` (one more sync, on the failure path only)."""
    if grad is None:
        return "is not finite"
    local = _local(grad)
    if bool(torch.isnan(local).any()):
        return "contains NaN"
    if bool(torch.isinf(local).any()):
        return "contains Inf"
    summed_in = torch.float32 if local.dtype in (torch.float16, torch.bfloat16) else None  # as checked
    if not math.isfinite(float(torch.linalg.vector_norm(local, dtype=summed_in))):
        return "has finite elements too large for its norm to be represented"
    return "is not finite on another rank"


def _as_tensors(losses: Sequence[torch.Tensor | float], device: torch.device) -> list[torch.Tensor]:
    """The kept losses as tensors (a CPU run keeps a bad loss as its float)."""
    return [loss if isinstance(loss, torch.Tensor) else torch.tensor(loss, device=device) for loss in losses]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A DTensor exists only where torch.distributed.tensor was imported (by FSDP): importing it
    # here just for the check would add ~0.5 s to `import ember`.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor
