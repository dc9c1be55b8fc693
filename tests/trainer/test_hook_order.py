"""The documented hook order (docs/concepts/hooks.md), locked for a fit with validation, accumulation
and a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback, ModelCheckpoint

CALLBACK_HOOKS = [name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")]


class Recorder(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def __getattribute__(self, name: str) -> Any:
        if name in CALLBACK_HOOKS:
            calls = object.__getattribute__(self, "calls")
            return lambda *args: calls.append(f"callback.{name}")
        return object.__getattribute__(self, name)


class RecordingCheckpoint(ModelCheckpoint):
    def __init__(self, calls: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = calls

    def on_save_checkpoint(self, trainer, module, checkpoint):  # type: ignore[no-untyped-def]
        self.calls.append("checkpoint.on_save_checkpoint")

    def on_validation_end(self, trainer, module):  # type: ignore[no-untyped-def]
        self.calls.append("checkpoint.on_validation_end")
        super().on_validation_end(trainer, module)

    def on_train_epoch_end(self, trainer, module):  # type: ignore[no-untyped-def]
        self.calls.append("checkpoint.on_train_epoch_end")
        super().on_train_epoch_end(trainer, module)


class Module(TrainModule):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls
        self.layer = torch.nn.Linear(2, 1)
        for name in dir(TrainModule):  # (the batch-transfer hooks return the batch: StepHooks has them)
            if isinstance(getattr(TrainModule, name), property):  # (on_gpu: a property, not a hook)
                continue
            if (name.startswith("on_") and not name.endswith("_batch_transfer")) or name in (
                "configure_model",
                "setup",
                "teardown",
            ):
                setattr(self, name, self._recorder(name))

    def _recorder(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append(f"module.{name}")

        return record

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.calls.append("module.training_step")
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.calls.append("module.validation_step")

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        self.calls.append("module.configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hook_order(tmp_path: Path) -> None:
    calls: list[str] = []
    data = TensorDataset(torch.randn(4, 2), torch.randn(4, 1))
    trainer = Trainer(
        max_epochs=1, accumulate_grad_batches=2, num_sanity_val_steps=1, limit_val_batches=1, logger=False,
        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Recorder(calls), RecordingCheckpoint(calls, dirpath=str(tmp_path / "ckpt"))],
    )  # fmt: skip
    trainer.fit(Module(calls), DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    train_batch = [
        "callback.on_train_batch_start", "module.on_train_batch_start",
        "module.training_step",
        "callback.on_before_backward", "module.on_before_backward",
        "callback.on_after_backward", "module.on_after_backward",
    ]  # fmt: skip
    # As Lightning's: the first batch of a window zeroes the gradients, after training_step
    zeroing = [
        *train_batch[:3],
        "callback.on_before_zero_grad",
        "module.on_before_zero_grad",
        *train_batch[3:],
    ]
    batch_end = ["callback.on_train_batch_end", "module.on_train_batch_end"]
    validation = [
        "module.on_validation_model_eval",
        "callback.on_validation_start", "module.on_validation_start",
        "callback.on_validation_epoch_start", "module.on_validation_epoch_start",
        "callback.on_validation_batch_start", "module.on_validation_batch_start",
        "module.validation_step",
        "callback.on_validation_batch_end", "module.on_validation_batch_end",
        "callback.on_validation_epoch_end", "module.on_validation_epoch_end",
    ]  # fmt: skip
    expected = [
        "callback.setup", "module.setup",
        "module.configure_model", "module.configure_optimizers",
        "callback.on_fit_start", "module.on_fit_start",
        "callback.on_sanity_check_start",
        *validation, "callback.on_validation_end", "module.on_validation_end", "checkpoint.on_validation_end",
        "module.on_validation_model_train",
        "callback.on_sanity_check_end",
        "callback.on_train_start", "module.on_train_start",
        "callback.on_train_epoch_start", "module.on_train_epoch_start",
        *zeroing, *batch_end,  # batch 0 accumulates
        *train_batch,  # batch 1 completes the window: the optimizer steps
        "callback.on_before_optimizer_step", "module.on_before_optimizer_step",
        *batch_end,
        "module.on_validation_model_zero_grad",  # a fit's validation, not the sanity check's
        *validation, "callback.on_validation_end", "module.on_validation_end", "checkpoint.on_validation_end",
        "module.on_validation_model_train",
        "callback.on_train_epoch_end", "module.on_train_epoch_end",
        # the monitoring callbacks last: the checkpoint sees the epoch's training and validation values
        "checkpoint.on_train_epoch_end",
        "callback.on_save_checkpoint", "module.on_save_checkpoint", "checkpoint.on_save_checkpoint",
        "callback.on_train_end", "module.on_train_end",
        "callback.on_fit_end", "module.on_fit_end",
        "callback.teardown", "module.teardown",
    ]  # fmt: skip
    assert calls == expected


def _fit_bare(tmp_path: Path, callback: Callback, epochs: int, batches: int) -> None:
    """Fit ``Module`` on ``batches`` batches of 2 per epoch, with ``callback`` and none of the defaults."""
    data = TensorDataset(torch.randn(2 * batches, 2), torch.randn(2 * batches, 1))
    trainer = Trainer(
        max_epochs=epochs, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(Module([]), DataLoader(data, batch_size=2))


def test_a_callback_added_during_the_fit_gets_the_next_hooks(tmp_path: Path) -> None:
    # What each hook runs is resolved once per stage (HookPlan), and again when the list changes.
    calls: list[str] = []

    class AddLater(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 0:
                trainer.callbacks.append(Recorder(calls))

    _fit_bare(tmp_path, AddLater(), epochs=1, batches=3)
    per_batch = [
        "callback.on_train_batch_start", "callback.on_before_zero_grad", "callback.on_before_backward",
        "callback.on_after_backward", "callback.on_before_optimizer_step", "callback.on_train_batch_end",
    ]  # fmt: skip
    assert calls == [
        *per_batch, *per_batch,  # batches 1 and 2
        "callback.on_train_epoch_end", "callback.on_train_end", "callback.on_fit_end", "callback.teardown",
    ]  # fmt: skip


def test_inactive_hooks_are_not_called_and_are_asked_again_each_epoch(tmp_path: Path) -> None:
    calls: list[tuple[int, str]] = []

    class QuietFirstEpoch(Callback):
        def inactive_hooks(self, trainer):  # type: ignore[no-untyped-def]
            return frozenset({"on_train_batch_end"}) if trainer.current_epoch == 0 else frozenset()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # type: ignore[no-untyped-def]
            calls.append((trainer.current_epoch, "start"))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            calls.append((trainer.current_epoch, "end"))

    _fit_bare(tmp_path, QuietFirstEpoch(), epochs=2, batches=2)
    assert calls == [(0, "start"), (0, "start"), (1, "start"), (1, "end"), (1, "start"), (1, "end")]


def test_builtin_callbacks_leave_out_the_batch_hooks_that_would_only_return(tmp_path: Path) -> None:
    from ember.callbacks import RichProgressBar

    trainer = Trainer(default_root_dir=str(tmp_path), logger=False)
    assert ModelCheckpoint().inactive_hooks(trainer) == {"on_train_batch_end"}
    assert ModelCheckpoint(every_n_train_steps=2).inactive_hooks(trainer) == set()

    class Saving(ModelCheckpoint):  # an override of the hook is always called
        def on_train_batch_end(self, *args: Any) -> None:
            pass

    assert Saving().inactive_hooks(trainer) == set()
    assert RichProgressBar().inactive_hooks(trainer) == set()
    assert "on_train_batch_end" in RichProgressBar(refresh_rate=0).inactive_hooks(trainer)


class StepHooks(Module):
    """Overrides Lightning's step and batch-transfer hooks, calling the defaults."""

    def on_before_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
        self.calls.append("module.on_before_batch_transfer")
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):  # type: ignore[no-untyped-def]
        self.calls.append("module.transfer_batch_to_device")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
        self.calls.append("module.on_after_batch_transfer")
        return batch

    def optimizer_step(self, *args):  # type: ignore[no-untyped-def]
        self.calls.append("module.optimizer_step")
        super().optimizer_step(*args)
        self.calls.append("<stepped>")

    def configure_gradient_clipping(self, *args):  # type: ignore[no-untyped-def]
        self.calls.append("module.configure_gradient_clipping")

    def optimizer_zero_grad(self, *args):  # type: ignore[no-untyped-def]
        self.calls.append("module.optimizer_zero_grad")
        super().optimizer_zero_grad(*args)

    def lr_scheduler_step(self, *args):  # type: ignore[no-untyped-def]
        self.calls.append("module.lr_scheduler_step")
        super().lr_scheduler_step(*args)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_step_and_transfer_hooks_order(tmp_path: Path) -> None:
    calls: list[str] = []
    data = TensorDataset(torch.randn(4, 2), torch.randn(4, 1))
    trainer = Trainer(
        max_epochs=1, accumulate_grad_batches=2, logger=False, default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[Recorder(calls)],
    )  # fmt: skip
    trainer.fit(StepHooks(calls), DataLoader(data, batch_size=2))
    start = calls.index("module.on_train_epoch_start") + 1
    transfer = [
        "module.on_before_batch_transfer",
        "module.transfer_batch_to_device",
        "module.on_after_batch_transfer",
    ]
    batch_start = ["callback.on_train_batch_start", "module.on_train_batch_start"]
    step = [
        "module.training_step",
        "callback.on_before_backward", "module.on_before_backward",
        "callback.on_after_backward", "module.on_after_backward",
    ]  # fmt: skip
    batch_end = ["callback.on_train_batch_end", "module.on_train_batch_end"]
    zero_grad = ["callback.on_before_zero_grad", "module.on_before_zero_grad", "module.optimizer_zero_grad"]
    assert calls[start : calls.index("callback.on_train_epoch_end")] == [
        # batch 0 accumulates: no optimizer_step; as the first of its window, it zeroes the gradients
        # after training_step, before the backward pass (Lightning's order)
        *transfer, *batch_start, step[0], *zero_grad, *step[1:], *batch_end,
        *transfer, *batch_start,
        "module.optimizer_step",  # the closure: training_step to clipping, inside optimizer.step()
        *step,
        "callback.on_before_optimizer_step", "module.on_before_optimizer_step",
        "module.configure_gradient_clipping",
        "<stepped>",
        "module.lr_scheduler_step",
        *batch_end,
    ]  # fmt: skip
