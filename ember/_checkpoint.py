"""``save_state`` / ``load_state`` / ``save_model``: ember's pickle-free checkpoint directory.

Layout of a ``save_state`` directory (``N`` counts from 0; the first object has no suffix)::

    manifest.json                      format, versions, strategy, world size, counts, file checksums
    model[_N].safetensors              full model weights
    optimizer[_N].json/.safetensors    optimizer state (structure / tensors)
    scheduler[_N].json                 LR scheduler state
    precision.json                     grad scaler state
    dataloaders.json                   seed, epoch and position of each prepared dataloader
    custom_checkpoint_N.json/...       objects given to register_for_checkpointing
    rng_rank<R>.json/.safetensors      RNG states of rank R
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ember._rng import rng_state, set_rng_state
from ember._wrappers import PreparedOptimizer, PreparedScheduler
from ember.data import PreparedDataLoader
from ember.strategies import Strategy
from ember.strategies.checkpoint_io import (
    CheckpointError,
    check_target,
    finalize_staged,
    prepare_staging,
    read_manifest,
    read_tree,
    staging_path,
    write_manifest,
    write_tree,
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


def tensors_for_safetensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state entry {name!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), int(tensor.storage_offset())))
        out[name] = tensor
    return out


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
    # Gathering a full state dict may be a collective (sharded strategies): every rank calls it.
    for i, model in enumerate(objects.models):
        weights = strategy.module_state_dict(model)
        if writer:
            save_file(
                tensors_for_safetensors(weights),
                str(staging / f"model{_suffix(i)}.safetensors"),
                metadata={"format": "pt"},
            )
    for i, optimizer in enumerate(objects.optimizers):
        state = strategy.optimizer_state_dict(optimizer.optimizer)
        if writer:
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
    write_tree(staging, f"rng_rank{strategy.global_rank}", rng_state())
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
    directory = Path(input_dir).absolute()
    manifest = read_manifest(directory)
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
    for i, model in enumerate(objects.models):
        strategy.load_module_state_dict(model, load_file(str(directory / f"model{_suffix(i)}.safetensors")))
    for i, optimizer in enumerate(objects.optimizers):
        strategy.load_optimizer_state_dict(
            optimizer.optimizer, read_tree(directory, f"optimizer{_suffix(i)}")
        )
    for i, scheduler in enumerate(objects.schedulers):
        scheduler.load_state_dict(read_tree(directory, f"scheduler{_suffix(i)}"))
    strategy.precision.load_state_dict(read_tree(directory, "precision"))
    for i, obj in enumerate(objects.custom):
        obj.load_state_dict(read_tree(directory, f"custom_checkpoint_{i}"))
    if same_world:
        for loader, state in zip(objects.dataloaders, read_tree(directory, "dataloaders"), strict=True):
            loader.load_state_dict(state)
        set_rng_state(read_tree(directory, f"rng_rank{strategy.global_rank}"))
    loaded = {name: read_tree(directory, name) for name in manifest.get("extra", [])}
    if same_world:
        for name in manifest.get("rank_extra", []):
            loaded[name] = read_tree(directory, f"{name}_rank{strategy.global_rank}")
    return loaded


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


def save_model(
    strategy: Strategy,
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    max_shard_size: int | str = "10GB",
) -> None:
    """Weights as safetensors, split into shards of at most ``max_shard_size`` with an index JSON."""
    limit = parse_size(max_shard_size)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_directory={str(directory)!r} exists and is not a directory")
    weights = strategy.module_state_dict(model)
    if strategy.is_global_zero:
        tensors = tensors_for_safetensors(weights)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        directory.mkdir(parents=True, exist_ok=True)
        if len(shards) == 1:
            written = {"model.safetensors"}
            _atomic_save(shards[0], directory / "model.safetensors")
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for shard, name in zip(shards, names, strict=True):
                _atomic_save(shard, directory / name)
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {key: name for shard, name in zip(shards, names, strict=True) for key in shard},
            }
            tmp = directory / ".model.safetensors.index.json.tmp"
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, directory / "model.safetensors.index.json")
            written = {*names, "model.safetensors.index.json"}
        # Weight files of an earlier save_model with another shard count would confuse loaders.
        for stale in directory.iterdir():
            if _WEIGHT_FILE.match(stale.name) and stale.name not in written:
                stale.unlink()
    strategy.barrier("save_model")


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
