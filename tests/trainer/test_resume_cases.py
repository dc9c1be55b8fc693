"""Bit-exact mid-epoch resume in the cases this loop's features add: accumulation windows that do not
divide the epoch, ``training_step`` returning None, a combined loader with an iterable dataset, the
16-mixed grad scaler, and monitoring callbacks' state. Each test runs a fit that is never stopped, one
that crashes after a step-boundary checkpoint, and a resume of the latter; the resumed parameters,
optimizer state (and grad-scaler state) must equal the uninterrupted fit's bit for bit."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback, EarlyStopping, ModelCheckpoint, OnExceptionCheckpoint
from ember.precision import MixedPrecision


def _data(n: int = 40, seed: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class _Net(TrainModule):
    """Dropout (the RNG streams must resume), AdamW (its moments), a step-interval scheduler."""

    def __init__(self, none_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.none_at = none_at  # batch_idx values whose training_step returns None

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx in self.none_at:
            return None
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.02)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Crash(Callback):
    """Raises before the batch after the one that made optimizer step ``at_step`` (its checkpoint saved)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _hex(value: Any) -> Any:
    """Every number in a (nested) state, as exact strings."""
    if isinstance(value, torch.Tensor):
        return [v.hex() if isinstance(v, float) else v for v in value.detach().flatten().tolist()]
    if isinstance(value, dict):
        return {k: _hex(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_hex(v) for v in value]
    return value.hex() if isinstance(value, float) else value


def _fit(
    root: Path,
    make: Callable[[], TrainModule],
    data: Callable[[], Any],
    crash_at: int = 0,
    resume: str = "",
    callbacks: Callable[[Path], list[Callback]] = lambda root: [],
    **options: Any,
) -> dict[str, Any]:
    torch.manual_seed(0)  # (the prepared loader's shuffle seed is torch.initial_seed() + epoch)
    module = make()
    if callable(options.get("plugins")):  # (a plugin holds state: a new one each fit)
        options = {**options, "plugins": options["plugins"]()}
    steps = ModelCheckpoint(dirpath=str(root / "steps"), every_n_train_steps=1, save_top_k=-1)
    extra: list[Callback] = [_Crash(crash_at), OnExceptionCheckpoint(root / "exception")] if crash_at else []
    trainer = Trainer(
        default_root_dir=str(root), logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks(root), steps, *extra], **{"max_epochs": 3, **options},
    )  # fmt: skip
    try:
        trainer.fit(module, *data(), ckpt_path=resume or None)
    except RuntimeError as err:
        if "simulated crash" not in str(err):
            raise
        return {"crashed": trainer.global_step}
    optimizer = trainer.optimizers[0]
    return {
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "params": _hex(dict(module.state_dict())),
        "optimizer": _hex(optimizer.state_dict()["state"]),
        "lr": _hex(optimizer.param_groups[0]["lr"]),
        "precision": _hex(trainer.accelerator.precision.state_dict()),
        "trainer": trainer,
    }


def _check_resume(
    tmp_path: Path,
    make: Callable[[], TrainModule],
    data: Callable[[], Any],
    crash_at: int,
    from_exception: bool = False,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``from_exception``: resume from OnExceptionCheckpoint's checkpoint, not ModelCheckpoint's."""
    full = _fit(tmp_path / "a", make, data, **options)
    crashed = _fit(tmp_path / "b", make, data, crash_at=crash_at, **options)
    assert crashed == {"crashed": crash_at}
    (ckpt,) = (tmp_path / "b" / "steps").glob(f"*-step={crash_at}")
    if from_exception:
        ckpt = tmp_path / "b" / "exception" / "on_exception"
    resumed = _fit(tmp_path / "b", make, data, resume=str(ckpt), **options)
    for key in ("step", "epoch", "params", "optimizer", "lr", "precision"):
        assert resumed[key] == full[key], key
    return full, resumed


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(_data(), batch_size=4, shuffle=True), DataLoader(_data(12, seed=3), batch_size=6)


# 10 batches an epoch, windows of 3: steps after batches 2, 5, 8 and the short window's 9. Step 3 is
# before the epoch's last (short) window, 4 its last batch, 6 the middle of the next epoch.
@pytest.mark.parametrize("crash_at", [3, 4, 6])
def test_accumulation_that_does_not_divide_the_epoch_resumes_exactly(tmp_path: Path, crash_at: int) -> None:
    full, _ = _check_resume(tmp_path, _Net, _loaders, crash_at, accumulate_grad_batches=3)
    assert full["step"] == 12


# None on a window's first batch (0, 3: it zeroes the gradients), in its middle (7) and on a whole
# window (the short window 9: a counted step that does not call the optimizer).
@pytest.mark.parametrize("crash_at", [2, 4, 5])
def test_training_step_returning_none_resumes_exactly(tmp_path: Path, crash_at: int) -> None:
    full, _ = _check_resume(
        tmp_path, lambda: _Net(none_at=(0, 3, 7, 9)), _loaders, crash_at, accumulate_grad_batches=3
    )
    assert full["step"] == 12


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """``n`` samples of ``_data``, in order, without a length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(_data(self.n, seed=11))


class _TwoLoaders(_Net):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        (xa, ya), (xb, yb) = batch
        return F.cross_entropy(self.net(xa), ya) + F.cross_entropy(self.net(xb), yb)


# max_size_cycle of a shuffled map-style loader of 10 batches and a stream of 6 or 14: the epoch
# ends when both were exhausted once; the shorter starts again in it.
# Step 3: the stream just ran out (6 batches); 4: in its second pass; 9: the map-style loader in its second.
@pytest.mark.parametrize("from_exception", [False, True], ids=["ModelCheckpoint", "OnExceptionCheckpoint"])
@pytest.mark.parametrize(("stream", "crash_at"), [(24, 3), (24, 4), (24, 7), (56, 4), (56, 9)])
def test_a_cycled_map_style_and_iterable_loader_resume_exactly(
    tmp_path: Path, stream: int, crash_at: int, from_exception: bool
) -> None:
    def data() -> tuple[list[DataLoader], DataLoader]:
        train, val = _loaders()
        return [train, DataLoader(_Stream(stream), batch_size=4)], val

    full, _ = _check_resume(tmp_path, _TwoLoaders, data, crash_at, from_exception, accumulate_grad_batches=2)
    assert full["step"] == 3 * math.ceil(max(10, stream // 4) / 2)


def test_16_mixed_with_accumulation_resumes_exactly(tmp_path: Path) -> None:
    # A large initial scale: steps 1-5 overflow and are skipped (the scale halves each time), later
    # ones grow it after 2 good steps or skip again; the checkpoints (2, 6, 9) fall in both phases
    # and at different counts of the scaler's growth tracker.
    def plugins() -> list[MixedPrecision]:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
        return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]

    for crash_at in (2, 6, 9):
        full, _ = _check_resume(
            tmp_path / str(crash_at), _Net, _loaders, crash_at, accumulate_grad_batches=3, plugins=plugins
        )
        assert full["trainer"].accelerator.precision.scaler.get_scale() < 2.0**24


class _Scored(_Net):
    """Logs ``score``, a fixed value per validation run (run 0: the sanity check; the count is
    checkpointed): the monitors' decisions depend on their restored state, not on the weights."""

    SCORES = (5.0, 3.0, 4.0, 2.0, 2.5, 2.6, 1.5, 1.0, 9.0)
    runs = 0

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().validation_step(batch, batch_idx)
        self.log("score", self.SCORES[min(self.runs, len(self.SCORES) - 1)])

    def on_validation_epoch_end(self) -> None:
        self.runs += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["runs"] = self.runs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.runs = checkpoint["runs"]


def _monitors(root: Path) -> list[Callback]:
    return [
        EarlyStopping(monitor="score", patience=4),
        ModelCheckpoint(
            dirpath=str(root / "best"),
            monitor="score",
            save_top_k=2,
            every_n_train_steps=3,
            filename="{epoch}-{step}-{score:.1f}",
        ),
    ]


@pytest.mark.parametrize("crash_at", [4, 8, 11, 15])
def test_early_stopping_and_monitored_checkpoints_resume_exactly(tmp_path: Path, crash_at: int) -> None:
    # Validation every 5 batches: twice an epoch (2 and 5 optimizer steps in, windows of 2). The
    # score improves at runs 1, 3, 6, 7 and not at 8-11: EarlyStopping(patience=4) stops after run
    # 11. The monitored checkpoint saves every 3 steps; at step 15, epoch 2's last batch, its save
    # waits for that epoch's validation (run 6, Lightning 2.6's deferral) and is one of the best two.
    options = {"accumulate_grad_batches": 2, "val_check_interval": 5, "max_epochs": 8, "callbacks": _monitors}
    full, resumed = _check_resume(tmp_path, _Scored, _loaders, crash_at, **options)

    def monitors(run: dict[str, Any], root: Path) -> dict[str, Any]:
        stopper, best = run["trainer"].early_stopping_callback, run["trainer"].checkpoint_callback
        assert isinstance(stopper, EarlyStopping) and isinstance(best, ModelCheckpoint)
        state = best.state_dict()
        del state["dirpath"]

        def rel(path: str) -> str:
            # (a checkpoint the crashed fit saved after the one resumed from is still there: the
            # resumed fit's save of the same name gets a version suffix, "-v1", as in Lightning)
            return re.sub(r"-v\d+$", "", str(Path(path).relative_to(root))) if path else path

        state["best_k_models"] = {rel(p): s for p, s in state["best_k_models"].items()}
        state["best_model_path"] = rel(state["best_model_path"])
        return {"stopper": stopper.state_dict(), "best": state, "stop": run["trainer"].should_stop}

    ours, theirs = monitors(resumed, tmp_path / "b"), monitors(full, tmp_path / "a")
    assert ours == theirs
    assert theirs["stop"] and theirs["stopper"]["wait_count"] == 4 and full["epoch"] < 7
    assert sorted(theirs["best"]["best_k_models"].values()) == [1.0, 1.5]


class _KeepsZeros(_Net):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):  # type: ignore[no-untyped-def]
        optimizer.zero_grad(set_to_none=False)


def test_none_on_a_whole_window_with_zeroed_not_freed_gradients_resumes_exactly(tmp_path: Path) -> None:
    # Step 3's checkpoint holds no gradients; the uninterrupted fit holds step 3's, zeroed (not
    # freed) by batch 9, whose training_step returns None: the short window's step.
    _check_resume(tmp_path, lambda: _KeepsZeros(none_at=(9,)), _loaders, 3, accumulate_grad_batches=3)
