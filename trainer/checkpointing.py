"""Trainer checkpoints: the Accelerator's pickle-free directory plus ``trainer_state.json``.

``trainer_state`` holds the loop counters, callback states, hyper-parameters, the running epoch
aggregates of ``self.log`` (with torchmetrics states) and the loggers' positions; whatever
``on_save_checkpoint`` hooks add to it comes back in ``on_load_checkpoint``.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ember._weights import fold_pruned, full_state_dict, load_model_weights
from ember.strategies.checkpoint_io import MANIFEST, CheckpointError, read_manifest, read_tree, verify_stem
from ember.strategies.checkpoint_swap import locate_checkpoint
from ember.strategies.environment import detect_environment
from ember.trainer.hooks import call_hook
from ember.trainer.hparams import init_kwargs, read_hparams_file

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = [
    "load_module",
    "load_weights",
    "newest_valid",
    "resolve_path",
    "restore",
    "resumes_automatically",
    "save",
    "save_last",
]

STATE = "trainer_state"
RANK_STATE = "trainer_rank_state"


def save(trainer: Trainer, path: str | os.PathLike[str], weights_only: bool = False) -> Path:
    """A Trainer checkpoint at ``path``, the module holding what the callbacks' ``checkpoint_weights``
    put in it while it is written."""
    with ExitStack() as weights:
        for callback in trainer.callbacks:
            weights.enter_context(callback.checkpoint_weights(trainer, trainer.module))
        return _save(trainer, path, weights_only)


def _save(trainer: Trainer, path: str | os.PathLike[str], weights_only: bool) -> Path:
    module = trainer.module
    if weights_only:  # the weights, with what loading them needs: no optimizer, loop or callback state
        weights: dict[str, Any] = {
            **module._hparams_checkpoint(),
            "loop": trainer.state.state_dict(),
        }
        module.on_save_checkpoint(weights)
        return trainer.accelerator.save_state(path, extra={STATE: weights}, weights_only=True)
    trainer._flush_row()  # saved in on_train_batch_end: the row of that batch belongs to it (every rank)
    for logger in trainer.loggers if trainer.is_global_zero else []:
        logger.save()  # the rows written so far belong to this checkpoint
    checkpoint: dict[str, Any] = {
        "loop": trainer.state.state_dict(),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
        **module._hparams_checkpoint(),
        "loggers": [logger.state_dict() for logger in trainer.loggers] if trainer.is_global_zero else [],
    }
    datamodule_state = trainer.datamodule.state_dict() if trainer.datamodule is not None else None
    if datamodule_state:  # (as Lightning: only a DataModule that has state)
        checkpoint["datamodule"] = datamodule_state
    call_hook(trainer, "on_save_checkpoint", checkpoint)
    # Running epoch aggregates and torchmetrics states differ per process: each saves its own.
    rank_state = {"metrics": trainer._metrics.state_dict(module)}
    return trainer.accelerator.save_state(
        path, extra={STATE: checkpoint}, rank_extra={RANK_STATE: rank_state}
    )


def restore(trainer: Trainer, path: Path) -> None:
    """Everything: weights, optimizers, schedulers, scaler, RNG, dataloader positions, loop and callbacks.

    The callbacks' states come first, read ahead of ``load_state``: a callback may rebuild what the
    saved optimizer state needs (``BaseFinetuning`` re-adds the parameter groups it added) before that
    state is loaded. That file's digest is checked before it is read; ``load_state`` then verifies
    every file before it loads any weight or optimizer state.
    """
    manifest = read_manifest(path, verify=False)
    if STATE not in manifest.get("extra", []):
        raise CheckpointError(
            f"{str(path)!r} was written by Accelerator.save_state, not by a Trainer (no {STATE})"
        )
    verify_stem(path, manifest, STATE)  # read ahead of load_state's verification: checked first
    early = read_tree(path, STATE)
    callback_states = early.get("callbacks", {}) if isinstance(early, dict) else {}  # (load_state checks)
    for callback in trainer.callbacks:
        if callback.state_key in callback_states:
            callback.load_state_dict(callback_states[callback.state_key])
    extra = trainer.accelerator.load_state(path)
    checkpoint = extra[STATE]
    trainer.state.load_state_dict(checkpoint["loop"])
    if "datamodule" in checkpoint and trainer.datamodule is not None:
        trainer.datamodule.load_state_dict(checkpoint["datamodule"])
    if RANK_STATE in extra:  # absent when the world size changed: epoch aggregates restart
        trainer._metrics.load_state_dict(extra[RANK_STATE]["metrics"], trainer.module)
    if trainer.is_global_zero:
        for logger, state in zip(trainer.loggers, checkpoint["loggers"], strict=False):
            if state:  # (none: a logger that kept nothing, e.g. fast_dev_run's stand-in)
                logger.load_state_dict(state)
    call_hook(trainer, "on_load_checkpoint", checkpoint)


def load_module(
    cls: type[TrainModule],
    checkpoint_path: str | os.PathLike[str],
    map_location: Any,
    strict: bool | None,
    overrides: dict[str, Any],
    hparams_file: str | os.PathLike[str] | None = None,
) -> TrainModule:
    """``cls`` built from a Trainer checkpoint's hyper-parameters (or ``hparams_file``'s, and
    ``overrides``), with its weights."""
    if map_location is not None and not isinstance(map_location, str | torch.device | int):
        raise ValueError(  # (torch.load's dict or function: ember reads the tensors onto the CPU)
            f"load_from_checkpoint(map_location={map_location!r}): valid choices are a device "
            "(a str such as 'cpu' or 'cuda:0', a torch.device or an index) or None, the CPU"
        )
    lightning = Path(checkpoint_path).is_file()  # a Lightning .ckpt: read in memory, pickle-free
    if lightning:
        from ember.trainer.lightning_ckpt import hparams_entries, read_lightning

        raw = read_lightning(checkpoint_path)
        checkpoint, weights = hparams_entries(raw, checkpoint_path), raw["state_dict"]
    else:
        path = _checkpoint_dir(checkpoint_path, "checkpoint_path")
        manifest = read_manifest(path)  # every file's digest checked
        if STATE not in manifest.get("extra", []):
            raise CheckpointError(
                f"{str(path)!r} was written by Accelerator.save_state, not by a Trainer (no {STATE}): build the "
                "module yourself and load its weights with Accelerator.load_state"
            )
        checkpoint = read_tree(path, STATE)
    if hparams_file is not None:  # (as Lightning: the file's in place of the checkpoint's)
        checkpoint = {**checkpoint, "hyper_parameters": read_hparams_file(hparams_file)}
    module = cls(**init_kwargs(cls, checkpoint, overrides))  # (the hyper-parameters it takes)
    if module._strict_loading is not None and strict is not None and strict != module.strict_loading:
        raise ValueError(
            f"load_from_checkpoint(..., strict={strict!r}) contradicts {cls.__name__}.strict_loading="
            f"{module.strict_loading!r}: give both the same value, or leave strict to the module"
        )
    strict = module.strict_loading if strict is None else strict
    module.configure_model()  # (as Lightning: layers it builds are there to load into)
    module.on_load_checkpoint(checkpoint)
    # (A pruned fit's weight_orig and weight_mask load into the plain module's weight.)
    state = fold_pruned(weights if lightning else full_state_dict(path, manifest), module.state_dict())
    keys = module.load_state_dict(state, strict=strict)
    if not strict:
        _warn_unmatched(keys.missing_keys, keys.unexpected_keys)
    return module.to(map_location) if map_location is not None else module


def _warn_unmatched(missing: list[str], unexpected: list[str]) -> None:
    """A non-strict load's warnings (``TrainModule.strict_loading=False``), as Lightning's."""
    if missing:
        warnings.warn(f"the checkpoint lacks these tensors of the module: {missing}", stacklevel=4)
    if unexpected:
        warnings.warn(f"the checkpoint has tensors the module lacks, not loaded: {unexpected}", stacklevel=4)


def load_weights(trainer: Trainer, path: Path) -> None:
    """Only the model weights (for validate/test/predict with ``ckpt_path``); all of them, shapes
    checked, unless ``module.strict_loading`` is False."""
    manifest = read_manifest(path)
    assert trainer._model is not None
    module = trainer.module
    if module.strict_loading:  # (the tensors checked against the model before any loads)
        load_model_weights(trainer.strategy, trainer._model, path, manifest)
        return
    # strict_loading=False: the full tensors the model has, through the strategy (sharded or not).
    own = module.state_dict()
    state = fold_pruned(full_state_dict(path, manifest), own)
    trainer.strategy.load_module_state_dict(trainer._model, state, strict=False)
    if trainer.is_global_zero:
        _warn_unmatched(sorted(set(own) - set(state)), sorted(set(state) - set(own)))


def resumes_automatically(trainer: Trainer) -> bool:
    """Whether a fit without ``ckpt_path`` resumes from the newest valid checkpoint (``auto_resume``;
    by default when the launcher restarted the processes, agreed by every process)."""
    wanted = trainer.config.auto_resume
    if wanted is None:  # the default: resume when the launcher restarted the processes
        restarted = float(detect_environment().restart_count > 0)
        flag = torch.tensor([restarted], device=trainer.accelerator.device)
        # torchelastic counts restarts per node (a node that only re-joined counts none): agree.
        if trainer.accelerator.num_processes > 1:
            flag = trainer.accelerator.reduce(flag, "max")
        wanted = bool(flag.item())
    if wanted and trainer.checkpoint_callback is None:
        if trainer.config.auto_resume:
            raise ValueError(
                "auto_resume=True looks for checkpoints in the ModelCheckpoint's directory, and this fit has "
                "no ModelCheckpoint (enable_checkpointing=False?)"
            )
        warnings.warn(
            "this process was restarted, but without a ModelCheckpoint the fit starts afresh",
            stacklevel=3,
        )
        return False
    return wanted


def resolve_path(trainer: Trainer, ckpt_path: str | os.PathLike[str]) -> Path | None:
    """A checkpoint directory, or ``"last"`` / ``"best"`` of the Trainer's ModelCheckpoint (``"last"``:
    or of an OnExceptionCheckpoint, the newest, as in Lightning). None: ``"last"`` and there is none
    yet (a first run), with a warning, as in Lightning."""
    if ckpt_path == "last":
        candidates = _last_candidates(trainer)
        found = _newest_of([path for _, path in candidates])
        if not found:
            where = " or ".join(sorted({repr(directory) for directory, _ in candidates}))
            warnings.warn(
                f"ckpt_path='last': there is no last checkpoint in {where} yet, so none is loaded (a fit "
                "starts afresh)",
                stacklevel=4,
            )
            return None
        ckpt_path = found
    elif ckpt_path == "best":
        callback = trainer.checkpoint_callback
        if callback is None:
            raise ValueError("ckpt_path='best' needs a ModelCheckpoint callback to find the checkpoint")
        if not callback.best_model_path:  # a ValueError, as Lightning's: the argument, not a file, is wrong
            raise ValueError(
                f"{trainer.stage}(ckpt_path='best'): the ModelCheckpoint has no best checkpoint (none saved "
                f"yet in {callback.resolved_dirpath(trainer)!r}, save_top_k=0, or fast_dev_run); pass a checkpoint "
                "directory as ckpt_path"
            )
        ckpt_path = callback.best_model_path
    path = _checkpoint_dir(ckpt_path, "ckpt_path")
    read_manifest(path, verify=False)
    return path


def _last_candidates(trainer: Trainer) -> list[tuple[str, str]]:
    """(directory, checkpoint or ""): each OnExceptionCheckpoint's newest ``<filename>``/``-vN``, and
    ModelCheckpoint's ``last`` (for a new Trainer the newest ``last``/``last-vN`` of its directory)."""
    from ember.callbacks.on_exception_checkpoint import OnExceptionCheckpoint

    found = [
        (cb.dirpath, _newest_last(Path(cb.dirpath), cb.filename))
        for cb in trainer.callbacks
        if isinstance(cb, OnExceptionCheckpoint)
    ]
    callback = trainer.checkpoint_callback
    if callback is None and not found:
        raise ValueError(
            "ckpt_path='last' needs a ModelCheckpoint or an OnExceptionCheckpoint callback to find the checkpoint"
        )
    if callback is not None:
        directory = callback.resolved_dirpath(trainer)
        found.append(
            (directory, callback.last_model_path or _newest_last(Path(directory), callback.last_name))
        )
    return found


def _newest_of(paths: list[str]) -> str:
    """The most recently written of ``paths`` (by its manifest); "" when none is a checkpoint."""
    written = {}
    for path in paths:
        manifest = locate_checkpoint(Path(path)) / MANIFEST if path else None
        if manifest is not None and manifest.is_file():
            written[path] = manifest.stat().st_mtime_ns
    return max(written, key=lambda path: written[path]) if written else ""


def _newest_last(directory: Path, name: str) -> str:
    """The most recently written of ``directory``'s ``name`` and ``name-vN`` checkpoints, or ""."""
    pattern = re.compile(rf"^{re.escape(name)}(-v\d+)?$")
    for path in _newest_first(directory):
        aside = _ASIDE.match(Path(path).name)  # (a killed save's complete copy stands for its name)
        if pattern.match(aside["name"] if aside is not None else Path(path).name):
            return path
    return ""


def _checkpoint_dir(given: str | os.PathLike[str], argument: str) -> Path:
    """The checkpoint directory ``given`` names (or the complete copy a killed save left beside it)."""
    path = locate_checkpoint(Path(given))
    if path.is_file():  # (TrainModule.load_from_checkpoint reads a Lightning .ckpt itself)
        raise CheckpointError(
            f"{argument}={str(given)!r} is a file; ember checkpoints are directories. For a Lightning .ckpt, "
            f"run `ember convert-lightning {given!s} OUT_DIR` and pass OUT_DIR"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{argument}={str(given)!r} does not exist (a checkpoint is a directory)")
    return path


def save_last(trainer: Trainer) -> Path | None:
    """Save into the ModelCheckpoint's ``last`` (what ``ckpt_path="last"`` finds); None without one."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return save(trainer, callback.claim_last(trainer))


def newest_valid(trainer: Trainer) -> Path | None:
    """For an automatic resume: the newest Trainer checkpoint of the ModelCheckpoint's directory that verifies.

    Newest is the most recently written (by its ``manifest.json``, the last file a save writes).
    Every process verifies each candidate (sizes and digests of every file); one that fails on any
    process is skipped by all, with a warning, and the next newest is tried. None: nothing to resume.
    """
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    accelerator, several = trainer.accelerator, trainer.accelerator.num_processes > 1
    # Rank 0 lists the directory, so that every process tries the same candidates in the same order.
    names = _newest_first(Path(callback.resolved_dirpath(trainer))) if trainer.is_global_zero else []
    candidates: list[str] = accelerator.broadcast_object(names) if several else names
    for candidate in candidates:
        error = ""
        try:
            read_manifest(Path(candidate))
        except CheckpointError as err:
            error = str(err)
        failed = torch.tensor([1.0 if error else 0.0], device=accelerator.device)
        if several:  # processes resuming from different checkpoints would silently train garbage
            failed = accelerator.reduce(failed, "max")
        if not failed.item():
            return Path(candidate)
        warnings.warn(
            f"automatic resume skips {candidate!r}: {error or 'another process could not verify it'}",
            stacklevel=3,
        )
    return None


_ASIDE = re.compile(r"^\.(?P<name>.+)\.(partial|old)$")  # where a killed save can leave a complete copy


def _newest_first(directory: Path) -> list[str]:
    names = set()
    for entry in directory.iterdir() if directory.is_dir() else []:
        aside = _ASIDE.match(entry.name)
        if aside is not None or not entry.name.startswith("."):  # other dot names: a save's debris
            names.add(aside["name"] if aside is not None else entry.name)
    found: dict[Path, tuple[int, str]] = {}
    for name in sorted(names):
        path = locate_checkpoint(directory / name)
        manifest = path / MANIFEST
        if not manifest.is_file():
            continue  # not a checkpoint (or a save that never finished)
        try:
            manifest_data = read_manifest(path, verify=False)
            # (a directory of Accelerator.save_state alone, or weights alone, cannot resume a fit)
            trainer_checkpoint = STATE in manifest_data.get("extra", []) and not manifest_data.get(
                "weights_only"
            )
        except CheckpointError:
            trainer_checkpoint = True  # unreadable: still a candidate, whose verification says why
        if trainer_checkpoint:
            found.setdefault(path.resolve(), (manifest.stat().st_mtime_ns, str(path)))
    return [name for _, name in sorted(found.values(), key=lambda item: (-item[0], item[1]))]
