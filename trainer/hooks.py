"""The hook contract: the one place that says in which order the Trainer calls hooks.

Every hook is dispatched by :func:`call_hook`: first the callbacks, then the module, then the
*monitoring* callbacks (``ModelCheckpoint``, ``EarlyStopping``), which thus see everything the
module logged in that hook. ``fit`` reads, as pseudocode::

    setup("fit")                        # the DataModule's (after prepare_data), the callbacks', the module's
    configure_model(); configure_optimizers()
    on_fit_start
    on_sanity_check_start; <validation loop, first num_sanity_val_steps batches>; on_sanity_check_end
    on_train_start
    for epoch:
        on_train_epoch_start
        for batch_idx, batch:
            on_train_batch_start(batch, batch_idx)       # the module returning -1 ends the epoch
            training_step(batch, batch_idx)
            on_before_backward(loss); <backward>; on_after_backward
            if this batch completes an accumulation window:
                on_before_optimizer_step(optimizer)      # gradients already unscaled
                <clip gradients>; <optimizer.step()>; <optimizer.zero_grad()>
                <step-interval LR schedulers>
            <write the step's logger row, every log_every_n_steps batches>
            on_train_batch_end(outputs, batch, batch_idx)
            if val_check_interval is reached: <validation loop>
        if validation is due this epoch: <validation loop>
        <epoch-level training metrics computed>
        on_train_epoch_end                              # callbacks, then the module
        <epoch logger row>; <epoch-interval LR schedulers>
        on_train_epoch_end                              # the monitoring callbacks
    on_train_end
    on_fit_end
    teardown("fit")

    validation loop (test: the same with "test"):
        on_validation_start; on_validation_epoch_start
        for batch: on_validation_batch_start; validation_step; on_validation_batch_end
        <epoch-level metrics computed>
        on_validation_epoch_end                         # values logged here join the epoch's
        <validation logger row>
        on_validation_end                               # ModelCheckpoint/EarlyStopping act here

    save_checkpoint: on_save_checkpoint(checkpoint)     # callbacks, then module
    fit(ckpt_path=...): on_load_checkpoint(checkpoint)  # callbacks, then module, before on_fit_start
    any exception: on_exception(exception)              # callbacks only

``tests/trainer/test_hook_order.py`` locks this order for a fit with validation, accumulation and a
checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

__all__ = ["call_hook"]


def call_hook(trainer: Trainer, name: str, *args: Any, part: str = "all", module_hook: bool = True) -> Any:
    """Call hook ``name`` on the callbacks and the module, in the documented order.

    ``part="first"`` stops before the monitoring callbacks and ``part="monitoring"`` calls only
    them: the loop does its own work in between (see the pseudocode above). Returns what the
    module's hook returned.
    """
    module = trainer.module
    callbacks = trainer.callbacks
    store = trainer._metrics
    previous, store.fx = store.fx, name
    result = None
    try:
        if part in ("all", "first"):
            for callback in callbacks:
                if not callback.monitoring:
                    getattr(callback, name)(trainer, module, *args)
            hook = getattr(module, name, None) if module_hook else None  # some hooks are callbacks' only
            if hook is not None:
                result = hook(*args)
        if part in ("all", "monitoring"):
            for callback in callbacks:
                if callback.monitoring:
                    getattr(callback, name)(trainer, module, *args)
        return result
    finally:
        store.fx = previous


def call_step(trainer: Trainer, name: str, *args: Any) -> Any:
    """Run ``module.<name>`` (training_step, validation_step ...) through the strategy and precision."""
    store = trainer._metrics
    previous, store.fx = store.fx, name
    try:
        module = trainer.module
        return trainer.accelerator.call_as_forward(trainer.model, getattr(module, name), *args)
    finally:
        store.fx = previous
