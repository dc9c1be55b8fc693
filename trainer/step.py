"""One training batch's optimisation under automatic optimisation: ``training_step``, the backward
pass and, at a step boundary, the optimizer step, with the hooks around them (Lightning's step
hooks included). :class:`Epoch` holds what every batch of an epoch asks, asked once."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ember._wrappers import LossClosure
from ember.strategies.capabilities import OwnsOptimizerStep
from ember.trainer.data import _datamodule_override
from ember.trainer.hooks import Entry, overridden, step_method
from ember.trainer.profilers.timed import profiled_epoch

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.trainer.logging import MetricStore
    from ember.trainer.module import TrainModule
    from ember.trainer.state import LoopState
    from ember.trainer.trainer import Trainer

__all__ = ["Epoch", "automatic_step", "backward", "detached", "loss_of", "manual_step", "module_backward"]


@dataclasses.dataclass(slots=True)
class Epoch:
    """What every training batch of one epoch asks and whose answer holds for the epoch: asked once."""

    limit: int | float  # the epoch's number of batches
    sized: bool  # the limit is known (else the loader says when it ends)
    automatic: bool  # automatic optimisation
    accumulate: int
    in_sync: bool  # automatic optimisation without accumulation: every batch a step boundary
    log_every: int  # a logger row every log_every-th batch that steps
    validates: bool  # validation may run inside this epoch
    step_schedulers: bool  # schedulers stepped per optimizer step
    several: bool  # several processes: pre-emption needs their agreement at each boundary
    unscales: bool  # the precision plugin unscales gradients before a step (16-mixed; bf16-mixed: a no-op)
    scaler: bool  # a grad scaler (16-mixed): a boundary whose training_step returned None does not step
    clip: float | None  # gradient_clip_val
    model: torch.nn.Module  # the prepared model
    training_step: Any  # the module's bound training_step
    run_batch: Any  # automatic_step or manual_step: a batch's optimisation (timed whole under a profiler)
    optimizer: Any  # the prepared optimizer (automatic optimisation)
    step: Any  # its step() and zero_grad() at a step boundary (PreparedOptimizer.boundary_calls)
    zero_grad: Any
    # The module's optimizer_step, optimizer_zero_grad and configure_gradient_clipping where it
    # overrides them (Lightning's hooks), else None: the Trainer's own code runs, a call less.
    module_step: Any
    module_zero_grad: Any
    module_clip: Any
    state: LoopState
    store: MetricStore
    accelerator: Accelerator
    gradient_state: Any  # the accelerator's: sync_gradients (a module's optimizer_zero_grad: _zero_grad)
    signals: Any  # the pre-emption signal catcher: .received is the signal got, or None
    # Gradients are freed right after a step boundary's batch (its on_train_batch_end) rather than on
    # the next window's first batch after training_step (Lightning's order), where nothing can tell
    # the difference: see ``_frees_early``. ``freed``: they were, the next window zeroes nothing.
    frees: bool = False
    freed: bool = False
    # A backward pass ran in this accumulation window (the window's first batch resets it): a step
    # boundary without one does not call the optimizer.
    window_backward: bool = False

    @classmethod
    def of(cls, trainer: Trainer, validates: bool) -> Epoch:
        config, limit = trainer.config, trainer.num_training_batches
        automatic = trainer.module.automatic_optimization
        accelerator = trainer.accelerator
        optimizer = trainer._step_optimizers[0] if automatic else None
        step, zero_grad = optimizer.boundary_calls() if optimizer is not None else (None, None)
        module = trainer.module
        epoch = cls(
            limit=limit,
            sized=not math.isinf(limit),
            automatic=automatic,
            accumulate=config.accumulate_grad_batches,
            in_sync=automatic and config.accumulate_grad_batches == 1,
            log_every=1 if config.fast_dev_run else config.log_every_n_steps,  # (Lightning's: every step)
            validates=validates,
            step_schedulers=automatic and bool(trainer.lr_scheduler_configs),
            several=accelerator.num_processes > 1,
            unscales=accelerator._unscales,
            scaler=accelerator.precision.scaler is not None,
            clip=config.gradient_clip_val,
            model=trainer.model,
            training_step=step_method(trainer.module, "training_step"),
            run_batch=automatic_step if automatic else manual_step,
            optimizer=optimizer,
            step=step,
            zero_grad=zero_grad,
            module_step=_module_step(module, optimizer) if automatic else None,
            module_zero_grad=overridden(module, "optimizer_zero_grad") if automatic else None,
            module_clip=overridden(module, "configure_gradient_clipping") if automatic else None,
            state=trainer.state,
            store=trainer._metrics,
            accelerator=accelerator,
            gradient_state=accelerator._gradient_state,
            signals=trainer._preemption.catcher,
        )
        epoch.frees = _frees_early(trainer, epoch)
        profiler = trainer.config.profiler  # chosen here, once an epoch: the batches test nothing
        return epoch if profiler is None else profiled_epoch(profiler, epoch, trainer)


def _frees_early(trainer: Trainer, epoch: Epoch) -> bool:
    """Whether the gradients of a step can be freed right after its batch (``on_train_batch_end``,
    before validation and the next batch is loaded) instead of on the next window's first batch after
    ``training_step``, as Lightning's loop does. The memory a step's gradients hold is then free
    while the next batch loads and runs forward (PyTorch's usual ``step(); zero_grad()``), which the
    benchmark of a small model measures at 1-2% of a step. Only where no hook sees the difference:
    nobody (module or callback) overrides ``on_train_batch_start`` or ``on_before_zero_grad``, the
    module overrides neither ``optimizer_zero_grad``, ``optimizer_step`` nor
    ``on_validation_model_zero_grad`` (which zeroes them before validation anyway), and neither the
    module nor the DataModule a batch-transfer hook (the next batch's run in between). Left to see it:
    the next ``training_step``, which finds no gradients (docs/concepts/hooks.md)."""
    if not epoch.automatic or epoch.module_zero_grad is not None or epoch.module_step is not None:
        return False
    hooks = trainer._hook_plan.entries(trainer)
    if hooks["on_train_batch_start"] is not None or hooks["on_before_zero_grad"] is not None:
        return False
    module, datamodule = trainer.module, trainer._datamodule
    if any(overridden(module, name) or _datamodule_override(datamodule, name) for name in _TRANSFER_HOOKS):
        return False
    return overridden(module, "on_validation_model_zero_grad") is None


# Lightning's batch-transfer hooks: they run on the next batch before its window zeroes the gradients.
_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _module_step(module: TrainModule, optimizer: Any) -> Any:
    """The module's ``optimizer_step`` where it overrides it, or where the optimizer's ``step`` needs a
    closure (LBFGS: Lightning runs ``training_step`` and the backward pass inside it); else None."""
    own = overridden(module, "optimizer_step")
    if own is not None or optimizer is None:
        return own
    closure = inspect.signature(optimizer.optimizer.step).parameters.get("closure")
    needs = closure is not None and closure.default is inspect.Parameter.empty
    return module.optimizer_step if needs else None


def automatic_step(
    trainer: Trainer,
    epoch: Epoch,
    hooks: dict[str, Entry | None],
    batch: Any,
    batch_idx: int,
    should_step: bool,
) -> Any:
    """``training_step``, backward and, at a step boundary, the optimizer step; returns the step's output."""
    if should_step and epoch.module_step is not None:
        return _step_by_module(trainer, epoch, hooks, batch, batch_idx)
    output = epoch.accelerator.call_as_forward(epoch.model, epoch.training_step, batch, batch_idx)
    loss = output if type(output) is torch.Tensor else loss_of(output)
    if epoch.in_sync or batch_idx % epoch.accumulate == 0:
        # As Lightning's: the first batch of a window zeroes the gradients after training_step and
        # before its backward pass (also when training_step returned None), so that a step's
        # gradients live on until then: on_train_batch_end, a checkpoint, validation see them.
        # Unless the loop freed them already, where nothing could see them (Epoch.frees).
        if epoch.freed:
            epoch.freed = False
        else:
            _zero_grad(epoch, hooks, batch_idx)
        epoch.window_backward = False
    if loss is not None:
        epoch.window_backward = True
        backward(trainer, hooks, loss)
        if should_step:
            _before_step(trainer, epoch, hooks)
            epoch.step()
            _after_step(trainer, epoch)
    elif should_step:
        # As Lightning's: training_step returned None, no backward ran, and the step boundary is one
        # all the same: its hooks run (clipping too), the step is counted, the schedulers step. The
        # optimizer steps with the gradients of the window's earlier batches; with none, it is not
        # called: zeroed gradients (optimizer_zero_grad with set_to_none=False) would still move
        # AdamW's weights, and a fit resumed at the last step boundary, which holds no gradients,
        # would not step there (an engine's step, DeepSpeed's, would apply its zeroed buffers).
        # Under the grad scaler (16-mixed) it does not step at all, as Lightning's MixedPrecision: the
        # gradients are not unscaled, the scale not updated (_before_step's ``unscale``).
        steps = epoch.window_backward and not epoch.scaler
        _before_step(trainer, epoch, hooks, steps)
        if steps:
            epoch.step()
        _after_step(trainer, epoch)
    return output


def manual_step(
    trainer: Trainer,
    epoch: Epoch,
    hooks: dict[str, Entry | None],
    batch: Any,
    batch_idx: int,
    should_step: bool,
) -> Any:
    """``training_step`` under manual optimisation: the module calls backward and steps itself."""
    output = epoch.accelerator.call_as_forward(epoch.model, epoch.training_step, batch, batch_idx)
    if epoch.unscales:  # the batch is the iteration: the grad scaler updates once, after its steps
        epoch.accelerator.precision.end_iteration()
    return output


def _step_by_module(
    trainer: Trainer, epoch: Epoch, hooks: dict[str, Entry | None], batch: Any, batch_idx: int
) -> Any:
    """A step boundary when the module overrides ``optimizer_step``, on Lightning's contract: the hook
    gets a closure that runs ``training_step``, zeroes the gradients (the window's first batch), runs
    the backward pass and what precedes a step, and calls ``optimizer.step(closure=...)``; code around
    that call runs before or after the step."""
    outputs: list[Any] = []
    zeroes = epoch.in_sync or batch_idx % epoch.accumulate == 0
    # Whether training_step's None skips the step (a LossClosure): under the grad scaler, as
    # Lightning's MixedPrecision; else, as automatic_step, where no earlier batch of the window ran a
    # backward pass (Lightning's bf16-mixed and 32-true step with the window's gradients).
    skips = epoch.scaler or zeroes or not epoch.window_backward

    def closure() -> torch.Tensor | None:
        output = epoch.accelerator.call_as_forward(epoch.model, epoch.training_step, batch, batch_idx)
        outputs.append(output)  # (LBFGS runs it several times: the last output is the step's)
        loss = output if type(output) is torch.Tensor else loss_of(output)
        if zeroes:  # (each evaluation: LBFGS's gets this point's gradients alone, as Lightning's)
            _zero_grad(epoch, hooks, batch_idx)
        if loss is not None:
            backward(trainer, hooks, loss)
        # As Lightning's, on_before_optimizer_step and the clipping run with no loss too.
        _before_step(trainer, epoch, hooks, loss is not None or not skips)
        return loss

    # A LossClosure: its None (training_step returned None) skips the update; the step is counted
    # all the same.
    epoch.module_step(
        epoch.state.epoch, batch_idx, epoch.optimizer, LossClosure(closure) if skips else closure
    )
    if not outputs:
        raise RuntimeError(
            f"{type(trainer.module).__name__}.optimizer_step() did not run the closure it was given, so "
            "training_step and the backward pass did not run: call optimizer.step(closure=optimizer_closure)"
        )
    _after_step(trainer, epoch)
    return outputs[-1]


def _zero_grad(epoch: Epoch, hooks: dict[str, Entry | None], batch_idx: int) -> None:
    """``on_before_zero_grad`` and zeroing the gradients (``optimizer_zero_grad``), on the first batch
    of a window."""
    entry = hooks["on_before_zero_grad"]  # (None, one lookup a window, when nobody overrides it)
    if entry is not None:
        for hook in entry[3]:
            hook(epoch.optimizer.optimizer)
    if epoch.module_zero_grad is None:
        epoch.zero_grad()  # (zeroes inside a window too: PreparedOptimizer.boundary_calls)
        return
    # The module's calls optimizer.zero_grad(), which does nothing inside an accumulation window (as
    # Accelerate's, for loops that call it every batch): here it runs as at a boundary.
    state = epoch.gradient_state
    syncs, state.sync_gradients = state.sync_gradients, True
    try:
        epoch.module_zero_grad(epoch.state.epoch, batch_idx, epoch.optimizer)
    finally:
        state.sync_gradients = syncs


def _before_step(
    trainer: Trainer, epoch: Epoch, hooks: dict[str, Entry | None], unscale: bool = True
) -> None:
    """What precedes an optimizer step: unscaling (16-mixed), ``on_before_optimizer_step``, clipping.

    ``unscale`` False: no step follows (training_step returned None). Under the grad scaler the hook
    and the clipping then see the gradients scaled, as Lightning's, and the clipping keeps them so,
    as on an accumulation micro-step (to the bound times the scale; Lightning's, to the bound): had it
    unscaled them, the scaler would not unscale the next window's before its step."""
    if unscale and epoch.unscales:
        epoch.accelerator.unscale_gradients()
    entry = hooks["on_before_optimizer_step"]
    if entry is not None:
        for hook in entry[3]:
            hook(epoch.optimizer.optimizer)
    if unscale or not epoch.scaler:
        if epoch.module_clip is not None or epoch.clip:  # (no call a step without clipping)
            _clip(trainer, epoch)
        return
    state = epoch.gradient_state  # (out of sync, the Accelerator's clipping leaves them scaled)
    syncs, state.sync_gradients = state.sync_gradients, False
    try:
        _clip(trainer, epoch)
    finally:
        state.sync_gradients = syncs


def _clip(trainer: Trainer, epoch: Epoch) -> None:
    """The module's ``configure_gradient_clipping`` where it overrides it, else ``gradient_clip_val``'s."""
    if epoch.module_clip is not None:
        config = trainer.config
        epoch.module_clip(epoch.optimizer.optimizer, config.gradient_clip_val, config.gradient_clip_algorithm)
    elif epoch.clip:
        trainer.module.clip_gradients(
            epoch.optimizer.optimizer, epoch.clip, trainer.config.gradient_clip_algorithm
        )


def _after_step(trainer: Trainer, epoch: Epoch) -> None:
    """What follows an optimizer step: the grad scaler's update, the step count, step-interval
    schedulers and, after the epoch's last batch, the epoch-interval ones that take no metric (as
    Lightning's: before on_train_batch_end and the epoch's validation, so both see the new rate).
    (The gradients stay until the next window's first batch zeroes them, as Lightning's, or the
    batch's end frees them: Epoch.frees.)"""
    if epoch.unscales:  # (the optimizer of an earlier fit, still prepared, will not step)
        epoch.accelerator.precision.end_iteration()
    epoch.state.global_step += 1
    if epoch.step_schedulers:
        trainer._step_schedulers("step")
        if trainer._is_last_batch:
            trainer._step_schedulers("epoch", metric=False)


def backward(
    trainer: Trainer, hooks: dict[str, Entry | None], loss: torch.Tensor, *args: Any, **kwargs: Any
) -> None:
    """``on_before_backward``, the backward pass, ``on_after_backward``: of the training loop, and of
    ``manual_backward`` (``hooks``: the trainer's resolved hooks, ``HookPlan.entries``)."""
    entry = hooks["on_before_backward"]
    if entry is not None:
        for hook in entry[3]:
            hook(loss)
    trainer._backward_pass(loss, *args, **kwargs)  # accelerator.backward or module_backward (profiler: timed)
    entry = hooks["on_after_backward"]
    if entry is not None:
        for hook in entry[3]:
            hook()


def module_backward(trainer: Trainer, method: Callable[..., Any]) -> Callable[..., None]:
    """The backward pass for a module that overrides ``backward`` (Lightning's hook): as
    ``Accelerator.backward``, the loss divided by the accumulation steps, then the strategy's backward
    (DDP's gradient sync, the precision's scaling), with ``method`` where ``loss.backward()`` would be."""
    accelerator, strategy = trainer.accelerator, trainer.strategy
    engine = isinstance(strategy, OwnsOptimizerStep)

    def run(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if engine:  # (raised at the first backward: validate and test attach the module too)
            raise ValueError(
                f"{type(trainer.module).__name__} overrides backward(), and the {strategy.strategy_name!r} "
                "engine runs the backward pass itself, together with its step: remove the override "
                "(on_before_backward / on_after_backward run around the engine's backward)"
            )
        steps = accelerator.gradient_accumulation_steps
        strategy.backward(loss / steps if steps > 1 else loss, *args, backward_fn=method, **kwargs)

    return run


def loss_of(output: Any) -> torch.Tensor | None:
    if output is None or isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"training_step must return a loss tensor, a dict with a 'loss' tensor, or None; it returned "
            f"{type(output).__name__}" + (" without a 'loss' tensor" if isinstance(output, Mapping) else "")
        )
    return loss


def batch_outputs(store: MetricStore, output: Any, normalize: int) -> Any:
    """What ``on_train_batch_end`` gets, as Lightning's: a dict of the step's detached ``"loss"``
    (divided by ``normalize``, the accumulation in automatic optimisation, as Lightning's) and the
    rest of a dict ``training_step`` returned; ``{}`` for ``None``."""
    if type(output) is torch.Tensor:
        loss = store.detached(output)  # (detached once per batch: self.log and the guard share it)
        return {"loss": loss / normalize if normalize > 1 else loss}
    if output is None:
        return {}
    outputs = detached(output)
    if isinstance(outputs, dict) and normalize > 1 and isinstance(outputs.get("loss"), torch.Tensor):
        outputs["loss"] = outputs["loss"] / normalize
    return outputs


def detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, Mapping):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    return output
