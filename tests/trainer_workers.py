"""A TrainModule and training functions shared by the parity and resume tests (in-process or per rank)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, Trainer, TrainModule
from ember.callbacks import Callback, ModelCheckpoint
from ember.strategies.environment import PREEMPTION_AGREE_VARIABLE
from ember.trainer.preemption import Preempted, PreemptionGuard


def dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class Augmented(TensorDataset):
    """``dataset()`` with random augmentation drawn in ``__getitem__`` from torch, NumPy and ``random``."""

    def __init__(self) -> None:
        super().__init__(*dataset().tensors)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(index)
        noise = 0.1 * torch.randn(x.shape) + float(np.random.uniform(-0.05, 0.05))
        return x * random.uniform(0.9, 1.1) + noise, y


class Net(TrainModule):
    """``metric_object``: the training accuracy is a torchmetrics ``Accuracy`` logged as an object
    (its state must resume exactly too), else a tensor. torchmetrics takes ~2 s to import (it loads
    SciPy and matplotlib): only the runs that test a metric object's resume pay for it."""

    def __init__(self, lr: float = 0.05, metric_object: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.train_acc = None
        if metric_object:
            import torchmetrics

            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.train_acc is not None:
            self.train_acc(logits, y)
            self.log("train_acc", self.train_acc, on_epoch=True)
        else:
            self.log("train_acc", (logits.argmax(dim=1) == y).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loaders() -> tuple[DataLoader, DataLoader]:
    """Training data shuffled and augmented in 2 worker processes; plain validation data.

    The workers start from a forkserver: a worker forked from a rank while one of gloo's threads
    creates a Python thread state deadlocks in CPython 3.11.7 (gh-112275; see
    docs/concepts/hangs-and-failures.md).
    """
    forkserver = multiprocessing.get_context("forkserver")
    # What the workers import, imported once by the server (it does not see this module's sys.path).
    forkserver.set_forkserver_preload(["torch", "ember.trainer", "ember.callbacks"])
    train = DataLoader(
        Augmented(), batch_size=4, shuffle=True, num_workers=2, multiprocessing_context=forkserver
    )
    return train, DataLoader(dataset(12), batch_size=5)


class Crash(Callback):
    """Dies in the middle of the accumulation window after optimizer step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.stepped = at_step, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step:
            if self.stepped:  # the batch after the one that stepped: half a window is accumulated
                raise RuntimeError("simulated crash")
            self.stepped = True


def fit(
    root: str,
    mode: str,
    crash_at: int = 7,
    resume: str = "",
    every: int = 3,
    strategy: str = "auto",
    metric_object: bool = False,
) -> dict:
    """mode 'full': 3 epochs; 'crash': dies after step ``crash_at``; 'resume': continues from ``resume``.

    The data comes from ``loaders()``; the model has dropout and a step-interval LR scheduler, with
    gradient accumulation and clipping; ``metric_object``: see ``Net``.
    """
    torch.manual_seed(0)
    callbacks: list[Callback] = [ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)]
    if mode == "crash":
        callbacks.append(Crash(crash_at))
    trainer = Trainer(
        max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=0.5, log_every_n_steps=1, strategy=strategy,
        callbacks=callbacks, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = Net(metric_object=metric_object)
    train, val = loaders()
    try:
        trainer.fit(module, train, val, ckpt_path=resume or None)
    except RuntimeError as err:
        if "simulated crash" not in str(err):
            raise
        return {"crashed": trainer.global_step}
    state = trainer.strategy.module_state_dict(trainer.model)  # full weights (FSDP: on rank 0 only)
    params = [v.hex() for key in sorted(state) for v in state[key].flatten().tolist()]
    rows = []
    if trainer.is_global_zero:
        with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
            rows = list(csv.reader(f))
    return {"params": params, "rows": rows, "step": trainer.global_step, "log_dir": trainer.log_dir}


def assert_logged_the_rest(full: list[list[str]], resumed: list[list[str]], from_step: int) -> None:
    """A run resumed into a new directory from the checkpoint of step ``from_step`` logged the rows
    the full run logged after that checkpoint, value for value (``fit`` logs every optimizer step:
    the first row after the checkpoint is the next step's)."""
    assert resumed[0] == full[0]  # the header
    rest = resumed[1:]
    assert rest and int(rest[0][0]) == from_step + 1 and len(rest) < len(full) - 5
    assert full[-len(rest) :] == rest


class PlateauNet(Net):
    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, threshold=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}


def fit_epochs(root: str, epochs: int, resume: str = "", then_test: bool = False) -> dict:
    """Default checkpointing (after each epoch's validation, with ``last``); optionally a test run after."""
    torch.manual_seed(0)
    trainer = Trainer(
        max_epochs=epochs, accumulate_grad_batches=2, log_every_n_steps=1, default_root_dir=root,
        callbacks=[ModelCheckpoint(save_last=True)], enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = PlateauNet(metric_object=True)
    trainer.fit(module, DataLoader(dataset(), batch_size=4, shuffle=True), DataLoader(dataset(12), batch_size=5),
                ckpt_path=resume or None)  # fmt: skip
    if then_test:  # a column the checkpoint never saw
        trainer.test(dataloaders=DataLoader(dataset(12), batch_size=5))
    params = [v.hex() for v in torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()]
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    return {"params": params, "rows": rows, "lr": lr}


class SignalAt(Callback):
    """At optimizer step ``at_step``, on global rank ``rank`` (-1: every rank), get signal ``signum``.

    With ``handshake`` (a path), it comes from outside: create ``<handshake>.ready`` and wait until
    the parent, having sent the signal, creates ``<handshake>.go``. Otherwise the process signals
    itself.
    """

    def __init__(self, at_step: int, signum: int, rank: int = -1, handshake: str = "") -> None:
        self.at_step, self.signum, self.rank, self.handshake = at_step, signum, rank, handshake

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step != self.at_step or self.rank not in (-1, trainer.global_rank):
            return
        if not self.handshake:
            os.kill(os.getpid(), self.signum)
            return
        Path(self.handshake + ".ready").touch()
        deadline = time.monotonic() + 60
        while not Path(self.handshake + ".go").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the parent never sent the signal")
            time.sleep(0.01)
        time.sleep(0.2)  # the handler runs at the main thread's next bytecode; be generous


class DieOnce(Callback):
    """A hard failure: at optimizer step ``at_step`` rank ``rank`` exits at once, if ``marker`` does not exist yet."""

    def __init__(self, at_step: int, rank: int, marker: str) -> None:
        self.at_step, self.rank, self.marker = at_step, rank, marker

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step and trainer.global_rank == self.rank:
            if not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)  # no exception, no cleanup: like a killed process


def fit_preemptible(
    root: str,
    ckpt_path: str = "",
    auto_resume: bool | None = None,
    signal_at: int = 0,
    signum: int = signal.SIGTERM,
    signal_rank: int = -1,
    handshake: str = "",
    catch: bool = True,
    die_at: int = 0,
    die_rank: int = 0,
    marker: str = "",
) -> dict:
    """3 epochs, a checkpoint every 3 optimizer steps; optionally a signal at ``signal_at`` or a hard
    exit at ``die_at``. A pre-empted fit returns where it stopped (``catch``) or exits with its status."""
    torch.manual_seed(0)
    callbacks: list[Callback] = [ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)]
    if signal_at:
        callbacks.append(SignalAt(signal_at, signum, signal_rank, handshake))
    if die_at:
        callbacks.append(DieOnce(die_at, die_rank, marker))
    trainer = Trainer(
        max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=0.5, log_every_n_steps=1, callbacks=callbacks,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, auto_resume=auto_resume,
    )  # fmt: skip
    module = Net()
    train, val = loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, train, val, ckpt_path=ckpt_path or None)
        except Preempted as stop:
            if not catch:
                raise
            return {"preempted_at": stop.global_step, "signal": stop.signal.name, "code": stop.code,
                    "checkpoint": str(stop.checkpoint)}  # fmt: skip
    state = trainer.strategy.module_state_dict(trainer.model)
    params = [v.hex() for key in sorted(state) for v in state[key].flatten().tolist()]
    rows = []
    if trainer.is_global_zero:
        with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
            rows = list(csv.reader(f))
    return {
        "params": params,
        "rows": rows,
        "step": trainer.global_step,
        "warnings": [str(w.message) for w in caught],
    }


def preemption_agreement(signal_at: int, seconds: str) -> dict[str, int]:
    """A rank of a 2-process group: step boundaries 10 ms apart; rank 1 is signalled at boundary
    ``signal_at``. Where this rank learns of the signal, and its interval between agreements."""
    os.environ[PREEMPTION_AGREE_VARIABLE] = seconds
    accelerator = Accelerator(strategy="ddp")
    guard = PreemptionGuard()
    with guard.during_fit():
        for boundary in range(1, 400):
            time.sleep(0.01)
            if boundary == signal_at and accelerator.process_index == 1:
                guard.catcher.received = signal.SIGUSR1
            if guard._agreed_signal(accelerator):
                result = {"boundary": boundary, "interval": guard._interval}
                guard.catcher.received = None  # (nothing to deliver again on the way out)
                return result
    return {"boundary": -1, "interval": guard._interval}
