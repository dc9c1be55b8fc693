"""``save_state`` / ``load_state``: ember's pickle-free checkpoint directory (model weights: ``_weights.py``).

Layout of a ``save_state`` directory (``N`` counts from 0; the first object has no suffix)::

    manifest.json                      format, versions, strategy, world size, layout, counts, file checksums
    model[_N].safetensors              full model weights                    (layout "full")
    optimizer[_N].json/.safetensors    optimizer state (structure / tensors) (layout "full")
    model[_N].shards/                  each rank's weight shards             (layout "sharded")
    optimizer[_N].json + .shards/      optimizer structure + each rank's shards (layout "sharded")
    scheduler[_N].json                 LR scheduler state
    precision.json                     grad scaler state
    dataloaders.json                   seed, epoch and position of each prepared dataloader
    custom_checkpoint_N.json/...       objects given to register_for_checkpointing
    rng_rank<R>.json/.safetensors      RNG states of rank R

Optimizer state is keyed by parameter name in both layouts, and either layout loads under any
strategy and world size (``docs/concepts/checkpoints.md``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember._hooks import StateHooks, run_load_hooks, run_save_hooks
from ember._rng import rng_state, set_rng_state
from ember._weights import (
    PORTABLE,
    check_weights,
    checkpoint_layout,
    load_model_weights,
    stream_weights,
    suffix,
    tensor_stream,
    weights_path,
)
from ember._wrappers import GradientState, PreparedOptimizer, PreparedScheduler
from ember.data import PreparedDataLoader
from ember.strategies import Strategy
from ember.strategies.capabilities import EngineCheckpoints
from ember.strategies.checkpoint_io import (
    CheckpointError,
    decode_tree,
    encode_tree,
    read_manifest,
    read_tree,
    write_json,
    write_manifest,
    write_tree,
)
from ember.strategies.checkpoint_swap import (
    check_target,
    finalize_staged,
    locate_checkpoint,
    prepare_staging,
    staging_path,
)
from ember.strategies.digests import deferred_syncs
from ember.strategies.optim_state import owner_module
from ember.strategies.sharded_io import (
    load_shards,
    save_shards,
)


@dataclass(slots=True)
class PreparedObjects:
    """Everything an Accelerator prepared or was asked to checkpoint, in preparation order."""

    models: list[nn.Module] = field(default_factory=list)
    optimizers: list[PreparedOptimizer] = field(default_factory=list)
    schedulers: list[PreparedScheduler] = field(default_factory=list)
    dataloaders: list[PreparedDataLoader] = field(default_factory=list)
    custom: list[Any] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "models": len(self.models),
            "optimizers": len(self.optimizers),
            "schedulers": len(self.schedulers),
            "dataloaders": len(self.dataloaders),
            "custom": len(self.custom),
        }


_RESERVED = (
    "model",
    "optimizer",
    "scheduler",
    "precision",
    "dataloaders",
    "custom_checkpoint",
    "rng_rank",
    "manifest",
)


def save_state(
    strategy: Strategy,
    objects: PreparedObjects,
    output_dir: str | os.PathLike[str],
    extra: dict[str, Any],
    rank_extra: dict[str, Any],
    weights_only: bool = False,
    hooks: StateHooks | None = None,
    gradient_state: GradientState | None = None,
) -> Path:
    for name in [*extra, *rank_extra]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name.startswith(_RESERVED):
            raise ValueError(
                f"extra state name {name!r} must be lowercase letters, digits and '_' and not start with "
                + ", ".join(repr(r) for r in _RESERVED)
            )
    directory = Path(output_dir).absolute()
    layout = checkpoint_layout(strategy)
    if weights_only and layout not in PORTABLE:  # an engine's weights, gathered into the full layout
        layout = "full"
    portable = layout in PORTABLE  # else the engine writes models and optimizers itself
    hooked = hooks is not None and bool(hooks.save)
    if hooked and not portable:
        raise RuntimeError(
            f"save_state() with a save_state pre-hook: strategy {strategy.strategy_name!r} saves its models in its "
            "engine's own checkpoint format, so there are no weights for the hook to change or pop; remove the "
            "hook (handle.remove()), or save_state(weights_only=True), which writes ember's full layout"
        )
    check_target(directory)  # every rank checks, so a refusal stops all ranks before any collective
    staging = staging_path(directory)
    if strategy.is_global_zero:
        prepare_staging(directory)
    strategy.barrier("save_state:staging")
    writer = strategy.is_global_zero
    models: list[nn.Module | dict[str, torch.Tensor]] = list(objects.models) if portable else []
    if hooked:  # before anything is written; the hooks may add files to the checkpoint
        assert hooks is not None
        models = list(run_save_hooks(strategy, hooks, objects.models, layout, staging))
    # As the main process's hooks left them (it writes the manifest); an engine saves every model.
    saved_models = len(models) if portable else len(objects.models)
    with deferred_syncs():  # fsyncs on threads while the next file is written; all done at the block's end
        if isinstance(strategy, EngineCheckpoints) and not portable:  # models and optimizers its own way
            strategy.save_engine_state(staging / layout)
        # Every rank takes part for every model and optimizer: gathering a full tensor, or writing
        # shards, is a collective under sharded strategies. A model is a module, or the state dict the
        # save hooks left for it.
        for i, model in enumerate(models):
            if layout == "sharded":
                state = model if isinstance(model, dict) else strategy.module_state_dict(model, full=False)
                save_shards(staging / f"model{suffix(i)}.shards", state)
            else:
                specs, tensors = (
                    tensor_stream(model) if isinstance(model, dict) else strategy.full_tensors(model)
                )
                stream_weights(
                    specs, tensors, [(staging / f"model{suffix(i)}.safetensors", len(specs))], writer
                )
        for i, optimizer in enumerate(objects.optimizers if portable and not weights_only else []):
            module = owner_module(objects.models, optimizer.optimizer)
            state = strategy.optimizer_state_dict(optimizer.optimizer, module, full=layout == "full")
            if layout == "sharded":
                structure, shards = encode_tree(state, copy=False)
                if writer:
                    write_json(staging / f"optimizer{suffix(i)}.json", structure)
                save_shards(staging / f"optimizer{suffix(i)}.shards", shards)
            elif writer:
                write_tree(staging, f"optimizer{suffix(i)}", state)
        if writer and not weights_only:
            for i, scheduler in enumerate(objects.schedulers):
                write_tree(staging, f"scheduler{suffix(i)}", scheduler.state_dict())
            write_tree(staging, "precision", strategy.precision.state_dict())
            write_tree(staging, "dataloaders", [loader.state_dict() for loader in objects.dataloaders])
            for i, obj in enumerate(objects.custom):
                write_tree(staging, f"custom_checkpoint_{i}", obj.state_dict())
        if writer:
            for name, value in extra.items():
                write_tree(staging, name, value)
        if not weights_only:
            write_tree(
                staging, f"rng_rank{strategy.global_rank}", rng_state(xla=strategy.accelerator == "xla")
            )
        for name, value in rank_extra.items():  # every rank's own state, like its RNG
            write_tree(staging, f"{name}_rank{strategy.global_rank}", value)
    strategy.barrier("save_state:written")
    if writer:
        write_manifest(
            staging,
            manifest_entries(
                strategy=strategy.strategy_name,
                world_size=strategy.world_size,
                layout=layout,
                counts={**({} if weights_only else objects.counts()), "models": saved_models},
                weights_only=weights_only,
                extra=extra,
                rank_extra=rank_extra,
                # accumulate()'s count (Accelerate's `step`): a resumed run steps on the same batches
                accumulation_step=0 if gradient_state is None else gradient_state.micro_step,
            ),
        )
        finalize_staged(staging, directory)
    strategy.barrier("save_state:done")
    return directory


def manifest_entries(
    *,
    strategy: str,
    world_size: int,
    layout: str,
    counts: dict[str, int],
    weights_only: bool,
    extra: Iterable[str],
    rank_extra: Iterable[str],
    accumulation_step: int,
) -> dict[str, Any]:
    """What ``manifest.json`` says of a checkpoint besides its files (``write_manifest`` adds those):
    the versions that wrote it, the strategy and layout, the count of each kind of object ..."""
    import ember

    return {
        "ember_version": ember.__version__,
        "torch_version": torch.__version__,
        "strategy": strategy,
        "world_size": world_size,
        "layout": layout,
        "counts": counts,
        "weights_only": weights_only,
        "extra": sorted(extra),
        "rank_extra": sorted(rank_extra),
        "accumulation_step": accumulation_step,
    }


def load_state(
    strategy: Strategy,
    objects: PreparedObjects,
    input_dir: str | os.PathLike[str],
    hooks: StateHooks | None = None,
    strict: bool = True,
    gradient_state: GradientState | None = None,
) -> dict[str, Any]:
    # A save killed while it replaced this checkpoint may have left the complete one beside it.
    directory = locate_checkpoint(Path(input_dir).absolute())
    manifest = read_manifest(directory)  # sizes, digests and format of every file
    converted = "converted_from" in manifest  # (ember convert-lightning: no loader or RNG state)
    if manifest.get("weights_only"):
        how = (
            "converted from a Lightning checkpoint that has none"
            if converted
            else "saved with weights_only=True, e.g. by ModelCheckpoint(save_weights_only=True)"
        )
        raise CheckpointError(
            f"checkpoint {str(directory)!r} holds model weights only ({how}), so training cannot resume from it; "
            "load its weights with ckpt_path= in validate/test/predict, TrainModule.load_from_checkpoint or "
            "ember consolidate"
        )
    layout, ours = manifest.get("layout", "full"), checkpoint_layout(strategy)
    portable = layout in PORTABLE
    if not portable and layout != ours:  # an engine's own format: only that engine reads it
        raise CheckpointError(
            f"checkpoint {str(directory)!r} holds the {layout!r} engine's own state; load it with "
            f"strategy={layout!r}, or take its weights with `ember consolidate` (any strategy loads those)"
        )
    if ours not in PORTABLE and layout != ours:
        raise CheckpointError(
            f"strategy {strategy.strategy_name!r} resumes only from its own checkpoints, and {str(directory)!r} has "
            f"the {layout!r} layout; to start from its weights, load them into the model before prepare()"
        )
    if not strict and not portable:
        raise ValueError(
            f"load_state(strict=False): strategy {strategy.strategy_name!r} restores its models from its engine's own "
            "checkpoint format, which ember loads strictly; strict=False applies to ember's full and sharded layouts"
        )
    hooked = hooks is not None and bool(hooks.load)
    if hooked and not portable:
        raise RuntimeError(
            f"load_state() with a load_state pre-hook: strategy {strategy.strategy_name!r} restores its models from "
            "its engine's own checkpoint format, so a hook cannot take models out of the loading; remove the "
            "hook (handle.remove())"
        )
    saved, current = manifest["counts"], objects.counts()
    for kind, count in current.items():
        if kind != "models" and not (converted and kind == "dataloaders") and saved.get(kind, 0) != count:
            raise CheckpointError(_count_mismatch(directory, kind, saved.get(kind, 0), count))
    models = objects.models
    if hooked:  # after the checks above (a refused checkpoint runs no hook), before any model loads
        assert hooks is not None
        models = run_load_hooks(hooks, objects.models, directory)
    if saved.get("models", 0) != len(models):
        raise CheckpointError(
            _model_mismatch(directory, saved.get("models", 0), len(objects.models), len(models), hooked)
        )
    # Loader positions and RNG streams: restored on the same world size; a converted Lightning
    # checkpoint has none (the run keeps its own, as a Lightning resume does).
    restores = manifest["world_size"] == strategy.world_size and not converted
    if not restores and not converted:  # another world size
        warnings.warn(
            f"checkpoint was saved with world size {manifest['world_size']}, this run has {strategy.world_size}: "
            "weights and optimizer state are restored, dataloader positions and RNG streams are not",
            stacklevel=3,
        )
    # Everything that can fail is read and checked before the first object changes: the models'
    # tensor names and shapes, and the small state, read whole now. A bad file never leaves a
    # half-restored run.
    for i, model in enumerate(models if portable else []):
        check_weights(weights_path(directory, layout, i), layout, strategy.full_tensors(model)[0], strict)
    schedulers = [_read_dict(directory, f"scheduler{suffix(i)}") for i in range(len(objects.schedulers))]
    precision = _read_dict(directory, "precision")
    custom = [read_tree(directory, f"custom_checkpoint_{i}") for i in range(len(objects.custom))]
    loaders: list[Any] = []
    rng: dict[str, Any] = {}
    if restores:
        loaders = read_tree(directory, "dataloaders")
        if not (
            isinstance(loaders, list)
            and len(loaders) == len(objects.dataloaders)
            and all(isinstance(state, dict) for state in loaders)
        ):
            raise CheckpointError(
                f"checkpoint file {str(directory / 'dataloaders.json')!r} must hold one dict per dataloader "
                f"({len(objects.dataloaders)})"
            )
        rng = _read_dict(directory, f"rng_rank{strategy.global_rank}")
    step = manifest.get("accumulation_step", 0)  # (absent from older checkpoints)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"checkpoint {str(directory)!r}: manifest.json's accumulation_step must be an int >= 0, got {step!r}"
        )
    loaded = {name: read_tree(directory, name) for name in manifest.get("extra", [])}
    if restores:
        for name in manifest.get("rank_extra", []):
            loaded[name] = read_tree(directory, f"{name}_rank{strategy.global_rank}")

    if isinstance(strategy, EngineCheckpoints):  # (then layout == ours, checked above)
        strategy.load_engine_state(directory / layout)
    for i, model in enumerate(models if portable else []):
        load_model_weights(strategy, model, directory, manifest, i, strict)
    for i, optimizer in enumerate(objects.optimizers if portable else []):
        module = owner_module(objects.models, optimizer.optimizer)
        stem = f"optimizer{suffix(i)}"
        if layout == "sharded":
            structure = json.loads((directory / f"{stem}.json").read_text())
            target = strategy.optimizer_state_dict(optimizer.optimizer, module, full=False)
            state = decode_tree(
                structure,
                load_shards(directory / f"{stem}.shards", encode_tree(target, copy=False)[1], strict=False),
            )
        else:
            state = read_tree(directory, stem)
        strategy.load_optimizer_state_dict(optimizer.optimizer, module, state)
    for scheduler, state in zip(objects.schedulers, schedulers, strict=True):
        scheduler.load_state_dict(state)
    strategy.precision.load_state_dict(precision)
    for obj, state in zip(objects.custom, custom, strict=True):
        obj.load_state_dict(state)
    if restores:
        for loader, state in zip(objects.dataloaders, loaders, strict=True):
            loader.load_state_dict(state)
        set_rng_state(rng)
        if gradient_state is not None:  # (with the loaders' positions: a new world restarts the epoch)
            gradient_state.micro_step = step
    return loaded


def _count_mismatch(directory: Path, kind: str, saved: int, count: int) -> str:
    return (
        f"checkpoint {str(directory)!r} holds {saved} {kind}, but this Accelerator has {count}; prepare "
        "(and register_for_checkpointing) the same objects as when it was saved"
    )


def _model_mismatch(directory: Path, saved: int, prepared: int, left: int, hooked: bool) -> str:
    if not hooked:
        message = _count_mismatch(directory, "models", saved, prepared)
    else:
        message = (
            f"checkpoint {str(directory)!r} holds {saved} models, and the load_state pre-hooks left {left} "
            f"of this Accelerator's {prepared} to load them into"
        )
    if hooked or saved < prepared:  # the models a save_state pre-hook popped are not in the checkpoint
        message += (
            ". A save_state pre-hook that pops entries of `weights` leaves those models out of the checkpoint: "
            "pop the same models from `models` in a load_state pre-hook (register_load_state_pre_hook)"
        )
    return message


def _read_dict(directory: Path, stem: str) -> dict[str, Any]:
    state = read_tree(directory, stem)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint file {str(directory / f'{stem}.json')!r} holds a {type(state).__name__}, not a state dict"
        )
    return state
