"""ember's pickle-free checkpoint files.

Any state made of dicts, lists, tuples, numbers, strings, ``None``, tensors and numpy arrays
(optimizer and scheduler state, RNG states, counters) is split into two files:

- ``<stem>.json`` — the structure, with tensors replaced by ``{"__tensor__": key}``;
- ``<stem>.safetensors`` — the tensors (only when there are any).

Loading reads JSON and safetensors; nothing is ever unpickled. A checkpoint *directory* is written
under a temporary name, listed in ``manifest.json`` with each file's size and SHA-256, and renamed
into place only when complete; loading verifies the manifest first and names any file that does
not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "check_target",
    "copy_checkpoint",
    "decode_tree",
    "encode_tree",
    "finalize_staged",
    "prepare_staging",
    "read_manifest",
    "read_tree",
    "write_json",
    "write_manifest",
    "write_tree",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, altered, or not an ember checkpoint."""


# -- the tree codec ------------------------------------------------------------------------------
def encode_tree(obj: Any, *, copy: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-serialisable structure and a flat dict of tensors.

    The tensors' keys are their paths in ``obj`` (the same structure always gives the same keys).
    ``copy=False`` keeps the tensors themselves (sharded DTensors stay sharded); by default they
    are detached CPU copies, ready for safetensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "_"
            while key in tensors:  # paths of keys holding dots can collide: keep every tensor
                key += "#"
            # safetensors wants dense, contiguous tensors that own their storage.
            tensors[key] = value.detach().cpu().contiguous().clone() if copy else value
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = path or "_"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {"__ndarray__": key}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: enc(v, f"{path}.{k}") for k, v in value.items()}
            # int keys (optimizer state), or keys that could be confused with our markers
            return {
                "__items__": [
                    [enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())
                ]
            }
        raise TypeError(
            f"cannot store {type(value).__name__} at {path or '<root>'!r} in a pickle-free checkpoint; "
            "state must be made of dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays"
        )

    return enc(obj, ""), tensors


def decode_tree(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(structure, list):
        return [decode_tree(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__ndarray__" in structure:
            return tensors[structure["__ndarray__"]].numpy()
        if "__tuple__" in structure:
            return tuple(decode_tree(v, tensors) for v in structure["__tuple__"])
        if "__items__" in structure:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in structure["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in structure.items()}
    return structure


def write_tree(directory: Path, stem: str, obj: Any) -> list[str]:
    """Write ``obj`` as ``stem.json`` (+ ``stem.safetensors``); return the file names written."""
    structure, tensors = encode_tree(obj)
    names = [f"{stem}.json"]
    write_json(directory / names[0], structure)
    if tensors:
        names.append(f"{stem}.safetensors")
        save_file(tensors, str(directory / names[1]))
    return names


def read_tree(directory: Path, stem: str) -> Any:
    structure = json.loads((directory / f"{stem}.json").read_text())
    weights = directory / f"{stem}.safetensors"
    tensors = load_file(str(weights)) if weights.exists() else {}
    return decode_tree(structure, tensors)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


# -- directories and manifests -------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    """List every file of ``directory`` with size and SHA-256 (call after all ranks wrote)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": _sha256(path),
            }
    write_json(
        directory / MANIFEST,
        {"format": "ember-checkpoint", "version": FORMAT_VERSION, **info, "files": files},
    )


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Read and (by default) verify a checkpoint directory; raise :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a complete ember checkpoint: {MANIFEST} is missing")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(manifest_path)!r} is not valid JSON: {err}") from None
    if manifest.get("format") != "ember-checkpoint":
        raise CheckpointError(f"{str(manifest_path)!r} is not an ember checkpoint manifest")
    if verify:
        for name, expected in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {str(path)!r} listed in the manifest is missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} has {size} bytes, the manifest says {expected['size']} (truncated?)"
                )
            if _sha256(path) != expected["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} does not match its SHA-256 in the manifest"
                )
    return manifest


def check_target(directory: Path) -> None:
    """Refuse to replace a non-empty directory that is not an ember checkpoint (the user's files)."""
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"checkpoint path {str(directory)!r} exists and is not a directory")
        if any(directory.iterdir()) and not (directory / MANIFEST).is_file():
            raise FileExistsError(
                f"checkpoint path {str(directory)!r} is a non-empty directory that is not an ember checkpoint; "
                "refusing to overwrite it"
            )


def prepare_staging(directory: Path) -> Path:
    """Create an empty temporary sibling of ``directory`` for a save (call on one rank only).

    :func:`finalize_staged` swaps it into place when every file is written, so an older checkpoint
    at ``directory`` is replaced only by a complete new one: a crash leaves the old or the new
    checkpoint, never a mix.
    """
    staging = staging_path(directory)
    if staging.exists():
        shutil.rmtree(staging)  # debris of an interrupted save: never a complete checkpoint
    staging.mkdir(parents=True)
    return staging


def staging_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.partial")


def finalize_staged(staging: Path, directory: Path) -> None:
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(staging, directory)
    _fsync_dir(directory.parent)
    if old.exists():
        shutil.rmtree(old)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a checkpoint identical to the complete checkpoint ``source`` (one rank only).

    Files are hard-linked where the file system allows (a finished checkpoint's files are never
    changed in place: a new save replaces the directory), else copied; the swap into place is the
    same atomic one as a save's.
    """
    read_manifest(source, verify=False)
    check_target(target)
    staging = prepare_staging(target)
    for path in sorted(source.rglob("*")):
        destination = staging / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)
    finalize_staged(staging, target)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
