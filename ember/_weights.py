"""Model weights in ember's checkpoints and in ``save_model`` directories (safetensors, pickle-free).

- ``save_model``: the full weights, split into files of at most ``max_shard_size`` with an index,
  written by rank 0 one tensor at a time.
- Weights of a ``save_state`` directory in any layout: checked against the model from the file
  headers (``check_weights``), loaded (``load_model_weights``) or written out as one safetensors
  file (``consolidate_checkpoint``, behind ``ember consolidate``).
- ``checkpoint_layout``: which layout a strategy writes (``"full"``, ``"sharded"``, or an engine's own).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.strategies import Strategy
from ember.strategies.capabilities import EngineCheckpoints
from ember.strategies.checkpoint_io import CheckpointError, load_tensors
from ember.strategies.sharded_io import (
    SafetensorsWriter,
    TensorSpec,
    consolidate,
    load_shards,
    shard_metadata,
)


def suffix(index: int) -> str:
    """The file-name suffix of the ``index``-th model (optimizer, ...) of a checkpoint."""
    return "" if index == 0 else f"_{index}"


def weights_path(directory: Path, layout: str, index: int) -> Path:
    return directory / f"model{suffix(index)}.{'shards' if layout == 'sharded' else 'safetensors'}"


def check_weights(
    path: Path, layout: str, specs: list[TensorSpec], strict: bool = True
) -> tuple[list[str], list[str]]:
    """The saved tensors are exactly the model's, with the same shapes (checked from the file
    headers, before anything is loaded: a strict ``load_state_dict`` would copy the tensors that
    fit, then raise). ``strict=False``: only the tensors both have must agree in shape, as in
    torch's ``load_state_dict(strict=False)``. Returns the missing and the unexpected names."""
    if layout == "sharded":
        saved = {name: shape for name, (_, shape) in shard_metadata(path).items()}
    else:
        from safetensors import safe_open  # at the first load: ember's import does not need it

        with safe_open(str(path), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    expected = {name: shape for name, _, shape in specs}
    if layout != "sharded":  # a pruned model's weights, loaded plain (load_model_weights folds them)
        for name, (orig, mask) in pruned_pairs(saved, expected).items():
            saved[name] = saved.pop(orig)
            del saved[mask]
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = [
        f"{name!r} is {list(saved[name])} there, {list(shape)} here"
        for name, shape in expected.items()
        if name in saved and tuple(saved[name]) != tuple(shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not fit this model: "
            + "; ".join(
                part
                for part in (
                    f"missing tensors {missing[:10]}" if missing and strict else "",
                    f"unexpected tensors {unexpected[:10]}" if unexpected and strict else "",
                    f"shapes differ: {', '.join(shapes[:10])}" if shapes else "",
                )
                if part
            )
            + ("" if strict else " (strict=False allows missing and unexpected tensors, not other shapes)")
        )
    return missing, unexpected


def pruned_pairs(saved: Iterable[str], expected: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Tensors saved re-parametrised by ``torch.nn.utils.prune`` (``<name>_orig`` and ``<name>_mask``,
    ``ModelPruning`` during a fit) that the model holds plain as ``<name>``: name -> (orig, mask)."""
    present, wanted = set(saved), set(expected)
    pairs = {}
    for name in sorted(wanted - present):
        orig, mask = f"{name}_orig", f"{name}_mask"
        if orig in present and mask in present and not {orig, mask} & wanted:
            pairs[name] = (orig, mask)
    return pairs


def fold_pruned(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` with each :func:`pruned_pairs` pair replaced by the tensor the model holds, ``orig * mask``
    (what ``torch.nn.utils.prune.remove`` leaves)."""
    for name, (orig, mask) in pruned_pairs(state, expected).items():
        state[name] = state.pop(orig) * state.pop(mask)
    return state


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
    strategy: Strategy,
    model: nn.Module,
    directory: Path,
    manifest: dict[str, Any],
    index: int = 0,
    strict: bool = True,
) -> None:
    """Load model ``index`` of a checkpoint (any layout) into a prepared model. ``strict=False``
    (portable layouts): the tensors both have are loaded, the others left (with a warning)."""
    layout = manifest.get("layout", "full")
    if layout not in PORTABLE:
        strategy.load_module_state_dict(model, engine_weights(directory, layout))
        return
    path = weights_path(directory, layout, index)
    specs = strategy.full_tensors(model)[0]
    names = {name for name, _, _ in specs}
    missing, unexpected = check_weights(path, layout, specs, strict)  # before the model changes
    if layout == "sharded":
        state = load_shards(path, strategy.module_state_dict(model, full=False), strict=strict)
    else:
        state = fold_pruned(load_tensors(path), names)
    if not strict:  # (a sharded strategy's loader would refuse tensors the model has no place for)
        state = {name: tensor for name, tensor in state.items() if name in names}
    strategy.load_module_state_dict(model, state, strict=strict)
    if (missing or unexpected) and strategy.is_global_zero:
        warnings.warn(
            f"load_state(strict=False), model {index}: "
            + "; ".join(
                part
                for part in (
                    f"the checkpoint lacks these tensors of the model, left as they were: {missing}"
                    if missing
                    else "",
                    f"the checkpoint has tensors the model lacks, not loaded: {unexpected}"
                    if unexpected
                    else "",
                )
                if part
            ),
            stacklevel=4,
        )


def full_state_dict(directory: Path, manifest: dict[str, Any], index: int = 0) -> dict[str, torch.Tensor]:
    """The full weights of model ``index`` of a verified checkpoint, on the CPU, whatever its layout
    (full, sharded, a DeepSpeed engine's): no strategy or process group needed."""
    layout = manifest.get("layout", "full")
    if layout not in PORTABLE:
        return engine_weights(directory, layout)
    if layout == "full":
        return load_tensors(weights_path(directory, layout, index))
    with tempfile.TemporaryDirectory() as tmp:  # the shards, put together into one file
        out = Path(tmp) / "model.safetensors"
        consolidate(directory / f"model{suffix(index)}.shards", out)
        return load_tensors(out)


def consolidate_checkpoint(directory: Path, out: Path, manifest: dict[str, Any], index: int = 0) -> list[str]:
    """The full weights of model ``index`` of a verified checkpoint, as the safetensors file ``out``."""
    layout = manifest.get("layout", "full")
    if layout == "sharded":
        return consolidate(directory / f"model{suffix(index)}.shards", out)
    if layout != "full":
        weights = engine_weights(directory, layout)
        specs, tensors = tensor_stream(weights)
        stream_weights(specs, tensors, [(out, len(specs))], True)
        return list(weights)
    source = directory / f"model{suffix(index)}.safetensors"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, out)
    from safetensors import safe_open

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
    stream_weights(
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


def tensor_stream(
    state: dict[str, torch.Tensor],
) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """A state dict in the form :func:`stream_weights` takes (as ``Strategy.full_tensors`` gives it)."""
    return [(name, t.dtype, tuple(t.shape)) for name, t in state.items()], iter(state.items())


def stream_weights(
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


PORTABLE = ("full", "sharded")  # ember's own layouts, which every strategy loads


def checkpoint_layout(strategy: Strategy) -> str:
    """``"full"``, ``"sharded"``, or the name of a strategy whose engine writes its own format."""
    if isinstance(strategy, EngineCheckpoints):
        return strategy.strategy_name
    return "sharded" if strategy.sharded_checkpoints else "full"
