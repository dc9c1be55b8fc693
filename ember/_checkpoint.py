"""``save_state`` / ``load_state`` / ``save_model``: ember's pickle-free checkpoint directory.

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
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ember._rng import rng_state, set_rng_state
from ember._wrappers import PreparedOptimizer, PreparedScheduler
from ember.data import PreparedDataLoader
from ember.strategies import Strategy
from ember.strategies.base import EngineCheckpoints
from ember.strategies.checkpoint_io import (
    CheckpointError,
    decode_tree,
    encode_tree,
    load_tensors,
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
from ember.strategies.optim_state import owner_module
from ember.strategies.sharded_io import (
    SafetensorsWriter,
    TensorSpec,
    consolidate,
    load_shards,
    save_shards,
    shard_metadata,
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


def _suffix(index: int) -> str:
    return "" if index == 0 else f"_{index}"


def save_state(
    strategy: Strategy,
    objects: PreparedObjects,
    output_dir: str | os.PathLike[str],
    extra: dict[str, Any],
    rank_extra: dict[str, Any],
) -> Path:
    for name in [*extra, *rank_extra]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name.startswith(_RESERVED):
            raise ValueError(
                f"extra state name {name!r} must be lowercase letters, digits and '_' and not start with "
                + ", ".join(repr(r) for r in _RESERVED)
            )
    directory = Path(output_dir).absolute()
    check_target(directory)  # every rank checks, so a refusal stops all ranks before any collective
    staging = staging_path(directory)
    if strategy.is_global_zero:
        prepare_staging(directory)
    strategy.barrier("save_state:staging")
    writer = strategy.is_global_zero
    layout = checkpoint_layout(strategy)
    if isinstance(strategy, EngineCheckpoints):  # the engine writes models and optimizers its own way
        strategy.save_engine_state(staging / layout)
    # Every rank takes part for every model and optimizer: gathering a full tensor, or writing
    # shards, is a collective under sharded strategies.
    portable = layout in _PORTABLE  # else the engine wrote models and optimizers above
    for i, model in enumerate(objects.models if portable else []):
        if layout == "sharded":
            save_shards(staging / f"model{_suffix(i)}.shards", strategy.module_state_dict(model, full=False))
        else:
            specs, tensors = strategy.full_tensors(model)
            _stream_weights(
                specs, tensors, [(staging / f"model{_suffix(i)}.safetensors", len(specs))], writer
            )
    for i, optimizer in enumerate(objects.optimizers if portable else []):
        module = owner_module(objects.models, optimizer.optimizer)
        state = strategy.optimizer_state_dict(optimizer.optimizer, module, full=layout == "full")
        if layout == "sharded":
            structure, shards = encode_tree(state, copy=False)
            if writer:
                write_json(staging / f"optimizer{_suffix(i)}.json", structure)
            save_shards(staging / f"optimizer{_suffix(i)}.shards", shards)
        elif writer:
            write_tree(staging, f"optimizer{_suffix(i)}", state)
    if writer:
        for i, scheduler in enumerate(objects.schedulers):
            write_tree(staging, f"scheduler{_suffix(i)}", scheduler.state_dict())
        write_tree(staging, "precision", strategy.precision.state_dict())
        write_tree(staging, "dataloaders", [loader.state_dict() for loader in objects.dataloaders])
        for i, obj in enumerate(objects.custom):
            write_tree(staging, f"custom_checkpoint_{i}", obj.state_dict())
        for name, value in extra.items():
            write_tree(staging, name, value)
    write_tree(staging, f"rng_rank{strategy.global_rank}", rng_state(xla=strategy.accelerator == "xla"))
    for name, value in rank_extra.items():  # every rank's own state, like its RNG
        write_tree(staging, f"{name}_rank{strategy.global_rank}", value)
    strategy.barrier("save_state:written")
    if writer:
        import ember

        write_manifest(
            staging,
            {
                "ember_version": ember.__version__,
                "torch_version": torch.__version__,
                "strategy": strategy.strategy_name,
                "world_size": strategy.world_size,
                "layout": layout,
                "counts": objects.counts(),
                "extra": sorted(extra),
                "rank_extra": sorted(rank_extra),
            },
        )
        finalize_staged(staging, directory)
    strategy.barrier("save_state:done")
    return directory


def load_state(
    strategy: Strategy, objects: PreparedObjects, input_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    # A save killed while it replaced this checkpoint may have left the complete one beside it.
    directory = locate_checkpoint(Path(input_dir).absolute())
    manifest = read_manifest(directory)  # sizes, digests and format of every file
    layout, ours = manifest.get("layout", "full"), checkpoint_layout(strategy)
    portable = layout in _PORTABLE
    if not portable and layout != ours:  # an engine's own format: only that engine reads it
        raise CheckpointError(
            f"checkpoint {str(directory)!r} holds the {layout!r} engine's own state; load it with "
            f"strategy={layout!r}, or take its weights with `ember consolidate` (any strategy loads those)"
        )
    if ours not in _PORTABLE and layout != ours:
        raise CheckpointError(
            f"strategy {strategy.strategy_name!r} resumes only from its own checkpoints, and {str(directory)!r} has "
            f"the {layout!r} layout; to start from its weights, load them into the model before prepare()"
        )
    saved, current = manifest["counts"], objects.counts()
    for kind, count in current.items():
        if saved.get(kind, 0) != count:
            raise CheckpointError(
                f"checkpoint {str(directory)!r} holds {saved.get(kind, 0)} {kind}, but this Accelerator has "
                f"{count}; prepare (and register_for_checkpointing) the same objects as when it was saved"
            )
    same_world = manifest["world_size"] == strategy.world_size
    if not same_world:
        warnings.warn(
            f"checkpoint was saved with world size {manifest['world_size']}, this run has {strategy.world_size}: "
            "weights and optimizer state are restored, dataloader positions and RNG streams are not",
            stacklevel=3,
        )
    # Everything that can fail is read and checked before the first object changes: the models'
    # tensor names and shapes, and the small state, read whole now. A bad file never leaves a
    # half-restored run.
    for i, model in enumerate(objects.models if portable else []):
        _check_weights(_weights_path(directory, layout, i), layout, strategy.full_tensors(model)[0])
    schedulers = [_read_dict(directory, f"scheduler{_suffix(i)}") for i in range(len(objects.schedulers))]
    precision = _read_dict(directory, "precision")
    custom = [read_tree(directory, f"custom_checkpoint_{i}") for i in range(len(objects.custom))]
    loaders: list[Any] = []
    rng: dict[str, Any] = {}
    if same_world:
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
    loaded = {name: read_tree(directory, name) for name in manifest.get("extra", [])}
    if same_world:
        for name in manifest.get("rank_extra", []):
            loaded[name] = read_tree(directory, f"{name}_rank{strategy.global_rank}")

    if isinstance(strategy, EngineCheckpoints):  # (then layout == ours, checked above)
        strategy.load_engine_state(directory / layout)
    for i, model in enumerate(objects.models if portable else []):
        load_model_weights(strategy, model, directory, manifest, i)
    for i, optimizer in enumerate(objects.optimizers if portable else []):
        module = owner_module(objects.models, optimizer.optimizer)
        stem = f"optimizer{_suffix(i)}"
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
    if same_world:
        for loader, state in zip(objects.dataloaders, loaders, strict=True):
            loader.load_state_dict(state)
        set_rng_state(rng)
    return loaded


def _read_dict(directory: Path, stem: str) -> dict[str, Any]:
    state = read_tree(directory, stem)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint file {str(directory / f'{stem}.json')!r} holds a {type(state).__name__}, not a state dict"
        )
    return state


def _weights_path(directory: Path, layout: str, index: int) -> Path:
    return directory / f"model{_suffix(index)}.{'shards' if layout == 'sharded' else 'safetensors'}"


def _check_weights(path: Path, layout: str, specs: list[TensorSpec]) -> None:
    """The saved tensors are exactly the model's, with the same shapes (checked from the file
    headers, before anything is loaded: a strict ``load_state_dict`` would copy the tensors that
    fit, then raise)."""
    if layout == "sharded":
        saved = {name: shape for name, (_, shape) in shard_metadata(path).items()}
    else:
        with safe_open(str(path), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    expected = {name: shape for name, _, shape in specs}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = [
        f"{name!r} is {list(saved[name])} there, {list(shape)} here"
        for name, shape in expected.items()
        if name in saved and tuple(saved[name]) != tuple(shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not fit this model: "
            + "; ".join(
                part
                for part in (
                    f"missing tensors {missing[:10]}" if missing else "",
                    f"unexpected tensors {unexpected[:10]}" if unexpected else "",
                    f"shapes differ: {', '.join(shapes[:10])}" if shapes else "",
                )
                if part
            )
        )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``"10GB"`` -> 10_000_000_000; ``"500MiB"`` -> 524_288_000; ints are bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if match is None:
            raise ValueError(
                f"max_shard_size={size!r} is not a size; use bytes or a string such as '10GB' or '500MB'"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def load_model_weights(
    strategy: Strategy, model: nn.Module, directory: Path, manifest: dict[str, Any], index: int = 0
) -> None:
    """Load model ``index`` of a checkpoint (any layout) into a prepared model."""
    layout = manifest.get("layout", "full")
    if layout not in _PORTABLE:
        strategy.load_module_state_dict(model, engine_weights(directory, layout))
        return
    path = _weights_path(directory, layout, index)
    _check_weights(path, layout, strategy.full_tensors(model)[0])  # before the model changes
    if layout == "sharded":
        strategy.load_module_state_dict(
            model, load_shards(path, strategy.module_state_dict(model, full=False))
        )
    else:
        strategy.load_module_state_dict(model, load_tensors(path))


def consolidate_checkpoint(directory: Path, out: Path, manifest: dict[str, Any], index: int = 0) -> list[str]:
    """The full weights of model ``index`` of a verified checkpoint, as the safetensors file ``out``."""
    layout = manifest.get("layout", "full")
    if layout == "sharded":
        return consolidate(directory / f"model{_suffix(index)}.shards", out)
    if layout != "full":
        weights = engine_weights(directory, layout)
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in weights.items()]
        _stream_weights(specs, iter(weights.items()), [(out, len(specs))], True)
        return list(weights)
    source = directory / f"model{_suffix(index)}.safetensors"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, out)
    with safe_open(str(out), framework="pt") as f:
        return list(f.keys())


def save_model(
    strategy: Strategy,
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    max_shard_size: int | str = "10GB",
) -> None:
    """Weights as safetensors, split into files of at most ``max_shard_size`` with an index JSON.

    Written by rank 0 one tensor at a time: a sharded model is gathered tensor by tensor, so the
    peak memory is this rank's shards plus one full tensor.
    """
    limit = parse_size(max_shard_size)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_directory={str(directory)!r} exists and is not a directory")
    specs, tensors = strategy.full_tensors(model)
    files: list[list[str]] = [[]]
    size = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    writer = strategy.is_global_zero
    if len(files) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    _stream_weights(
        specs, tensors, [(directory / n, len(f)) for n, f in zip(names, files, strict=True)], writer
    )
    if writer:
        written = set(names)
        if len(files) > 1:
            index = {
                "metadata": {
                    "total_size": sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in specs)
                },
                "weight_map": {key: name for name, keys in zip(names, files, strict=True) for key in keys},
            }
            tmp = directory / ".model.safetensors.index.json.tmp"
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, directory / "model.safetensors.index.json")
            written.add("model.safetensors.index.json")
        # Weight files of an earlier save_model with another shard count would confuse loaders.
        for stale in directory.iterdir():
            if _WEIGHT_FILE.match(stale.name) and stale.name not in written:
                stale.unlink()
    strategy.barrier("save_model")


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _stream_weights(
    specs: list[TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    files: list[tuple[Path, int]],
    writer: bool,
) -> None:
    """Write the tensors, in order, into ``files`` (path, how many) on the writing rank. Every rank
    must consume ``tensors``: a sharded tensor is gathered (a collective) as it comes, then dropped."""
    start = 0
    for path, count in files:
        part = specs[start : start + count]
        start += count
        with SafetensorsWriter(path, part) if writer else nullcontext() as out:
            for _ in part:
                name, tensor = next(tensors)
                if out is not None:
                    out.write(name, tensor)


def engine_weights(directory: Path, layout: str) -> dict[str, torch.Tensor]:
    """Full weights out of an engine's own checkpoint (its files are read the engine's way)."""
    if layout == "deepspeed":
        from ember.strategies.deepspeed import zero_checkpoint_weights

        return zero_checkpoint_weights(directory / layout)
    raise CheckpointError(f"checkpoint {str(directory)!r} has the unknown layout {layout!r}")


_PORTABLE = ("full", "sharded")  # ember's own layouts, which every strategy loads


def checkpoint_layout(strategy: Strategy) -> str:
    """``"full"``, ``"sharded"``, or the name of a strategy whose engine writes its own format."""
    if isinstance(strategy, EngineCheckpoints):
        return strategy.strategy_name
    return "sharded" if strategy.sharded_checkpoints else "full"
