"""Lightning ``.ckpt`` files, read without running their pickles: ``ember convert-lightning`` and
``TrainModule.load_from_checkpoint("model.ckpt")``.

A Lightning checkpoint is one ``torch.save``'d dict (Lightning 2.x, ``_CheckpointConnector.dump_checkpoint``):
``state_dict``, ``hyper_parameters`` (+ ``hparams_name``), ``optimizer_states``, ``lr_schedulers``,
``epoch``, ``global_step``, ``loops``, ``callbacks``, and the precision plugin's state under its class
name (``MixedPrecision``: the grad scaler's). It is read with torch's restricted unpickler
(``weights_only=True``), which builds only tensors and plain containers and never imports code; a file
it refuses is refused here too, never opened with the full unpickler.

The converted directory is an ember Trainer checkpoint (``manifest.json`` says ``converted_from``). It
resumes a fit with one optimizer: weights, optimizer and scheduler state, the grad scaler, and the loop
counters (a checkpoint taken at the end of a training epoch resumes at the next epoch, as in
Lightning). Lightning saves no RNG or dataloader state, so the run keeps its own (as a Lightning
resume does). Of the callback states, those that mean the same in ember are carried over under
ember's keys: ``EarlyStopping{'monitor': ..., 'mode': ...}`` (wait count, best score, stopped epoch,
reason) for an ``EarlyStopping`` with that monitor and mode, and ``Timer``'s training time (the only
time a Lightning resume restores). ``ModelCheckpoint``'s is dropped on purpose: it names Lightning's
``.ckpt`` files, which ember's top-k bookkeeping could later delete, and nothing a user saved is ever
lost. Any other or malformed callback state is dropped too, without an error.
Anything else (several optimizers, a weights-only checkpoint) converts as weights only.
"""

from __future__ import annotations

import ast
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ember._checkpoint import manifest_entries
from ember._weights import stream_weights, tensor_stream
from ember.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from ember.callbacks.timer import Timer
from ember.strategies.checkpoint_io import MANIFEST, CheckpointError, encode_tree, write_manifest, write_tree
from ember.strategies.checkpoint_swap import finalize_staged, staging_path
from ember.trainer.checkpointing import STATE

__all__ = ["LightningCheckpointError", "convert_lightning", "hparams_entries", "read_lightning"]

_PRECISION_KEYS = ("MixedPrecision", "native_amp_scaling_state")  # Lightning 2.x's, then 1.x's


class LightningCheckpointError(CheckpointError):
    """A file is not a Lightning checkpoint, or holds objects that cannot be read without unpickling code."""


def read_lightning(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict in a Lightning ``.ckpt``, read with ``torch.load(weights_only=True)`` onto the CPU."""
    file = Path(path)
    if not file.is_file():
        raise LightningCheckpointError(f"Lightning checkpoint {str(path)!r} is not a file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # (else not a pickle torch wrote at all)
        if found is None:
            raise LightningCheckpointError(
                f"{str(path)!r} is not a Lightning checkpoint (torch.load could not read it: {err})"
            ) from None
        raise LightningCheckpointError(
            f"{str(path)!r} holds the object {found.group(1)!r}, which cannot be read without running code from the file "
            "(torch.load(weights_only=True) refuses it; ember never unpickles). Usually a custom class in "
            "the hyper-parameters: in Lightning, load the checkpoint you trust, keep plain values (numbers, "
            "strings, lists, dicts) in checkpoint['hyper_parameters'], torch.save it, and convert that file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise LightningCheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint (torch.load could not read it: {err})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LightningCheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint: a Lightning .ckpt is a dict with a 'state_dict' "
            "entry (and 'epoch', 'global_step', ...)"
        )
    bad = [key for key, value in checkpoint["state_dict"].items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise LightningCheckpointError(f"{str(path)!r}: state_dict entries {bad} are not tensors")
    return checkpoint


def hparams_entries(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The Trainer-checkpoint entries that rebuild the module (``trainer/hparams.py``'s ``init_kwargs``)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    try:
        encode_tree(hparams)
    except TypeError as err:
        raise LightningCheckpointError(
            f"{str(path)!r}: its hyper-parameters cannot be stored: {err}"
        ) from None
    entries: dict[str, Any] = {"hyper_parameters": hparams}
    name = checkpoint.get("hparams_name")
    # Lightning's "kwargs": the __init__ arguments; another name: the one dict/Namespace argument
    # they came from, which Lightning passes back as a dict.
    if isinstance(name, str) and name != "kwargs":
        entries.update(hparams_name=name, hparams_type="dict")
    return entries


def _loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """ember's ``LoopState`` from Lightning's ``loops`` (a checkpoint taken once the epoch's training
    batches ran resumes at the next epoch, as Lightning does)."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    batches = fit.get("epoch_loop.batch_progress", {})
    done = int(batches.get("total", {}).get("completed", 0))
    global_step = int(checkpoint.get("global_step", 0))
    epoch, batch_idx = int(checkpoint.get("epoch", 0)), int(batches.get("current", {}).get("completed", 0))
    if batches.get("is_last_batch", False):
        epoch, batch_idx = (
            int(fit.get("epoch_progress", {}).get("current", {}).get("processed", epoch + 1)),
            0,
        )
    stepped = fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", global_step)
    return {
        "epoch": epoch,
        "global_step": global_step,
        "batch_idx": batch_idx,
        "total_batch_idx": done,
        "stepped_batches": int(stepped),
        "train_done": False,
        "val_done": False,
        "epoch_done": False,
    }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _early_stopping(key: str, state: Any) -> tuple[str, dict[str, Any]] | None:
    """ember's key and state for Lightning's ``EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}``."""
    found = re.fullmatch(r"EarlyStopping(\{.*\})", key, re.DOTALL)
    if found is None or not isinstance(state, dict):
        return None
    try:  # (literal_eval builds literals only: the key runs no code)
        args = ast.literal_eval(found.group(1))
        stopper = EarlyStopping(monitor=args["monitor"], mode=args["mode"])  # (checks both)
        best = state["best_score"]  # Lightning's: a 0-d tensor
        best = float(best.item() if isinstance(best, torch.Tensor) else best)
        reason = EarlyStoppingReason(state.get("stopping_reason", 0)).value
    except (ValueError, TypeError, KeyError, SyntaxError, RecursionError, RuntimeError):
        return None
    message = state.get("stopping_reason_message")
    if not (_count(state.get("wait_count")) and _count(state.get("stopped_epoch"))) or not (
        message is None or isinstance(message, str)
    ):
        return None
    patience = state["patience"] if _count(state.get("patience")) else stopper.patience
    return stopper.state_key, {"wait_count": state["wait_count"], "stopped_epoch": state["stopped_epoch"],
        "best_score": best, "patience": patience, "stopping_reason": reason,
        "stopping_reason_message": message}  # fmt: skip


def _timer(key: str, state: Any) -> tuple[str, dict[str, Any]] | None:
    """ember's ``Timer`` state from Lightning's: the training time alone, which is all that a
    Lightning resume restores (its other stages restart at 0)."""
    elapsed = state.get("time_elapsed") if key == "Timer" and isinstance(state, dict) else None
    train = elapsed.get("train") if isinstance(elapsed, dict) else None
    if (
        isinstance(train, bool)
        or not isinstance(train, (int, float))
        or not math.isfinite(train)
        or train < 0
    ):
        return None
    return Timer().state_key, {"time_elapsed": {"train": float(train)}}


def _callback_states(saved: Any) -> dict[str, Any]:
    """The callback states carried over (see the module's docstring), under ember's keys."""
    states: dict[str, Any] = {}
    for key, state in saved.items() if isinstance(saved, dict) else ():
        converted = (_early_stopping(key, state) or _timer(key, state)) if isinstance(key, str) else None
        if converted is not None:
            states[converted[0]] = converted[1]
    return states


def resumable(checkpoint: dict[str, Any]) -> str:
    """Why the checkpoint converts as weights only ("" when it can resume a fit)."""
    if "loops" not in checkpoint or "optimizer_states" not in checkpoint:
        return "it holds no optimizer or loop state (saved with save_weights_only=True?)"
    if len(checkpoint["optimizer_states"]) != 1:
        return f"it holds {len(checkpoint['optimizer_states'])} optimizers; ember resumes Lightning fits with one"
    return ""


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT_DIR {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"OUT_DIR {str(out)!r} is not empty; give a new or empty directory")


def convert_lightning(ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write the Lightning checkpoint ``ckpt`` as the ember Trainer checkpoint ``out_dir`` (new or empty).

    Returns the directory and why it holds weights only ("" when ``fit(ckpt_path=...)`` resumes from it).
    Every check runs before anything is written; the directory appears complete or not at all.
    """
    out = Path(out_dir).absolute()
    _check_out(out)
    checkpoint = read_lightning(ckpt)
    state: dict[str, Any] = hparams_entries(checkpoint, ckpt)
    why = resumable(checkpoint)
    schedulers = [] if why else list(checkpoint.get("lr_schedulers", []))
    precision: dict[str, Any] = next((checkpoint[key] for key in _PRECISION_KEYS if key in checkpoint), {})
    state.update(
        loop=_loop_state(checkpoint), callbacks=_callback_states(checkpoint.get("callbacks")), loggers=[]
    )
    for what, value in (
        ("lr_schedulers", schedulers),
        ("optimizer_states", checkpoint.get("optimizer_states")),
    ):
        try:
            encode_tree(value)
        except TypeError as err:
            raise LightningCheckpointError(f"{str(ckpt)!r}: its {what} cannot be stored: {err}") from None
    staging = staging_path(out)
    if staging.exists():
        shutil.rmtree(staging)  # (a conversion killed earlier: its debris)
    staging.mkdir(parents=True)
    weights = checkpoint["state_dict"]
    stream_weights(*tensor_stream(weights), [(staging / "model.safetensors", len(weights))], True)
    if not why:
        write_tree(staging, "optimizer", checkpoint["optimizer_states"][0])  # by position: loads as is
        for i, scheduler in enumerate(schedulers):  # (the Trainer registers its schedulers as objects)
            write_tree(staging, f"custom_checkpoint_{i}", scheduler)
        write_tree(staging, "precision", precision)
    write_tree(staging, STATE, state)
    counts = {"models": 1, "optimizers": 1, "schedulers": 0, "dataloaders": 0, "custom": len(schedulers)}
    entries = manifest_entries(strategy="single_device", world_size=1, layout="full",
                               counts={"models": 1} if why else counts, weights_only=bool(why), extra=[STATE],
                               rank_extra=[], accumulation_step=0)  # fmt: skip
    version = str(checkpoint.get("pytorch-lightning_version", "unknown"))
    write_manifest(staging, {**entries, "converted_from": f"lightning {version}"})
    if out.is_dir():
        out.rmdir()  # empty, checked above
    finalize_staged(staging, out)
    assert (out / MANIFEST).is_file()
    return out, why
