"""ember's pickle-free checkpoint files.

Any state made of dicts, lists, tuples, numbers, strings, ``None``, tensors and numpy arrays
(optimizer and scheduler state, RNG states, counters) is split into two files:

- ``<stem>.json`` — the structure, with tensors replaced by ``{"__tensor__": key}``;
- ``<stem>.safetensors`` — the tensors (only when there are any).

Loading reads JSON and safetensors; nothing is ever unpickled. A checkpoint *directory* lists its
files in ``manifest.json`` with each file's size and digest (XXH3-128; manifests of version 1 hold
SHA-256 digests, still read and verified); loading verifies the manifest first and names any file
that does not match. The digests detect corruption and truncation (bit rot, torn copies, partial
writes); they are no signature: the manifest travels with the files it lists. The directory is
written under a temporary name, fsynced, and swapped into place only when complete
(:mod:`ember.strategies.checkpoint_swap`).

``safetensors`` is imported on the first read or write of a tensor file, not with ember: a run that
never checkpoints never loads it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ember.strategies.digests import DIGEST, DIGESTS, file_digest, hash_file, make_durable, new_digest
from ember.strategies.environment import usable_cpus
from ember.strategies.tree_codec import decode_tree, encode_tree

__all__ = [
    "CheckpointError",
    "decode_tree",
    "encode_tree",
    "read_manifest",
    "read_tree",
    "write_json",
    "write_manifest",
    "write_tree",
]

FORMAT_VERSION = 2  # 1: files listed with their SHA-256 ("sha256"); 2: with their XXH3-128 ("xxh3_128")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, altered, or not an ember checkpoint."""


def write_tree(directory: Path, stem: str, obj: Any) -> list[str]:
    """Write ``obj`` as ``stem.json`` (+ ``stem.safetensors``); return the file names written."""
    from ember.strategies.sharded_io import SafetensorsWriter, storable

    structure, tensors = encode_tree(obj, copy=False)
    names = [f"{stem}.json"]
    write_json(directory / names[0], structure)
    if tensors:
        names.append(f"{stem}.safetensors")
        path = directory / names[1]
        if all(storable(t.dtype) for t in tensors.values()):
            # Streamed one tensor at a time, without a copy of the state, and hashed as it is
            # written (the manifest then need not read the file back): the bulk of a save.
            with SafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]) as out:
                for key, tensor in tensors.items():
                    out.write(key, tensor)
        else:  # a dtype only safetensors' own writer knows
            save_file({k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}, str(path))
            _fsync(path)  # save_file does not; write_json and SafetensorsWriter do
    return names


def save_file(tensors: dict[str, torch.Tensor], filename: str) -> None:
    """``safetensors.torch.save_file``, imported at the first call."""
    from safetensors.torch import save_file as save

    save(tensors, filename)


def read_tree(directory: Path, stem: str) -> Any:
    """Inverse of :func:`write_tree`; a file that does not hold a tree raises :class:`CheckpointError`."""
    path = directory / f"{stem}.json"
    structure = _read_json(path)
    weights = directory / f"{stem}.safetensors"
    tensors = load_tensors(weights) if weights.exists() else {}
    return _decode(structure, tensors, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a file that is not safetensors named in a :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is not a valid safetensors file: {err}"
        ) from None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint file {str(path)!r} is not valid JSON: {err}") from None


def _decode(structure: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    try:
        return decode_tree(structure, tensors)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not hold an ember state tree "
            f"({type(err).__name__}: {err}); was it written by save_state?"
        ) from None


def write_json(path: Path, obj: Any, final: Path | None = None) -> None:
    """Write ``obj`` to ``path`` as JSON, fsynced (see :func:`~ember.strategies.digests.make_durable`:
    renamed to ``final`` once durable, if given) and noted with its digest."""
    data = json.dumps(obj, indent=1, allow_nan=True).encode()
    digest = new_digest()
    digest.update(data)
    file = open(path, "wb")
    try:
        file.write(data)
        file.flush()
    except BaseException:
        file.close()
        raise
    make_durable(file, path, digest.hexdigest(), final)


def _fsync(path: Path) -> None:
    """fsync the file or the folder at ``path`` (a folder: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- directories and manifests -------------------------------------------------------------------
_VERIFY_THREADS = 8  # large files hashed at once by read_manifest
_PARALLEL_HASH_BYTES = 1 << 22  # smaller files are hashed on the calling thread


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    """List every file of ``directory`` with size and :data:`DIGEST` (call after all ranks wrote).

    The manifest is written last and appears atomically (temporary name, fsync, rename): a directory
    with a ``manifest.json`` holds every file the manifest lists.
    """
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = {
                "size": path.stat().st_size,
                DIGEST: file_digest(path),
            }
    manifest = {"format": "ember-checkpoint", "version": FORMAT_VERSION, **info, "files": files}
    write_json(directory / f".{MANIFEST}.tmp", manifest, final=directory / MANIFEST)


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Read and (by default) verify a checkpoint directory; raise :class:`CheckpointError` naming the bad file.

    Verifying checks, before anything is loaded: every listed file's size and digest (with the
    algorithm its manifest entry names: XXH3-128, or SHA-256 in version-1 manifests); that no
    unlisted file would be read (``.json``/``.safetensors`` files, anything under ``deepspeed/``);
    that every JSON file parses, every safetensors header is valid, and every tensor a JSON file
    refers to is in its safetensors file(s).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a complete ember checkpoint: {MANIFEST} is missing")
    try:
        manifest: Any = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{str(manifest_path)!r} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ember-checkpoint":
        raise CheckpointError(f"{str(manifest_path)!r} is not an ember checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{str(manifest_path)!r} has manifest version {version!r}; this ember reads versions 1 to "
            f"{FORMAT_VERSION} (was the checkpoint written by a newer ember?)"
        )
    _check_manifest(manifest, manifest_path)
    if verify:
        _verify(directory, manifest["files"])
    return manifest


def verify_stem(directory: Path, manifest: dict[str, Any], stem: str) -> None:
    """Check the size and digest of the files of ``stem`` (``<stem>.json``, ``<stem>.safetensors``)
    against ``manifest``: for state read ahead of the full verification of :func:`read_manifest`."""
    for name, expected in manifest["files"].items():
        if name.split(".", 1)[0] != stem:
            continue
        path, algorithm = directory / name, _algorithm(expected)
        if (
            not path.is_file()
            or path.stat().st_size != expected["size"]
            or hash_file(path, algorithm) != expected[algorithm]
        ):
            raise CheckpointError(f"checkpoint file {str(path)!r} does not match its entry in the manifest")


def _verify(directory: Path, files: dict[str, Any]) -> None:
    """Check every listed file's size and digest, then :func:`_check_unlisted` and
    :func:`_check_formats`; raise the first failure in that order (files in the manifest's order).

    Large files are hashed on a few threads at once (file reads, ``xxhash`` and ``hashlib`` release
    the GIL) while this thread hashes the small ones and runs the other checks: verifying costs
    about the time of the largest file, not of the sum. The other checks' errors wait until every digest is
    known to match, so the error raised is the one a check of one file after the other would raise.
    """
    problem, listed = None, []
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            problem = f"checkpoint file {str(path)!r} listed in the manifest is missing"
            break
        size = path.stat().st_size
        if size != expected["size"]:
            problem = f"checkpoint file {str(path)!r} has {size} bytes, the manifest says {expected['size']} (truncated?)"
            break
        listed.append((path, expected))
    large = {path for path, expected in listed if expected["size"] >= _PARALLEL_HASH_BYTES}
    workers = min(_VERIFY_THREADS, usable_cpus(), len(large)) if len(large) > 1 else 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ember-verify") if workers else None
    later: Exception | None = None
    try:
        futures = (
            {path: pool.submit(hash_file, path, _algorithm(e)) for path, e in listed if path in large}
            if pool
            else {}
        )
        digests = {path: hash_file(path, _algorithm(e)) for path, e in listed if path not in futures}
        if problem is None:
            try:  # while the threads hash the large files; raised after the digests are compared
                _check_unlisted(directory, files)
                _check_formats(directory, files)
            except Exception as err:
                later = err
        for path, expected in listed:
            algorithm = _algorithm(expected)
            if (futures[path].result() if path in futures else digests[path]) != expected[algorithm]:
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} does not match its {DIGESTS[algorithm][1]} in the manifest"
                )
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    if problem is not None:
        raise CheckpointError(problem)
    if later is not None:
        raise later


def _algorithm(entry: dict[str, Any]) -> str:
    """The key of :data:`DIGESTS` a manifest entry holds its digest under (:func:`_check_manifest`
    made sure there is exactly one)."""
    return next(key for key in DIGESTS if key in entry)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The fields loaders use have the types they expect, and every name stays inside the directory."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{str(path)!r} is malformed: {what}")

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad(f"'files' must map file names to their size and {DIGEST}")
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise bad(f"file name {name!r} is not a path inside the checkpoint")
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and len(digests := [key for key in DIGESTS if key in entry]) == 1
            and isinstance(entry[digests[0]], str)
        ):
            raise bad(
                f"the entry of {name!r} must be {{'size': int, {DIGEST!r}: str}} "
                f"(or another digest: one of {sorted(DIGESTS)})"
            )
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(_is_int(v) and v >= 0 for v in counts.values()):
        raise bad("'counts' must map object kinds to counts")
    if not _is_int(manifest.get("world_size")) or manifest["world_size"] < 1:
        raise bad("'world_size' must be an int >= 1")
    if not isinstance(manifest.get("layout", "full"), str):
        raise bad("'layout' must be a string")
    for key in ("extra", "rank_extra"):
        names = manifest.get(key, [])
        if not isinstance(names, list) or not all(
            isinstance(n, str) and re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names
        ):
            raise bad(f"{key!r} must be a list of lowercase names")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unlisted(directory: Path, files: dict[str, Any]) -> None:
    # Loaders read whole folders (DCP reads every shard file, DeepSpeed globs its own): a file added
    # after the save would be read without being verified.
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if not path.is_file() or name == MANIFEST or name in files:
            continue
        if path.suffix in (".json", ".safetensors") or name.startswith("deepspeed/"):
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not listed in the manifest (added after the save?)"
            )


def _check_formats(directory: Path, files: dict[str, Any]) -> None:
    """Every ember file parses, and every tensor a JSON file refers to exists (DeepSpeed's are its own)."""
    from safetensors import SafetensorError, safe_open

    keys: dict[str, set[str]] = {}  # a safetensors file, or a .shards folder -> the tensor names in it
    for name in sorted(files):
        path = directory / name
        if name.startswith("deepspeed/") or path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a valid safetensors file: {err}"
            ) from None
        parent = PurePosixPath(name).parent
        owner = parent.as_posix() if parent.suffix == ".shards" else name
        keys.setdefault(owner, set()).update(names)
    for name in sorted(files):
        path = directory / name
        if name.startswith("deepspeed/") or path.suffix != ".json":
            continue
        structure = _read_json(path)
        stem = name[: -len(".json")]
        tensors = keys.get(f"{stem}.safetensors", keys.get(f"{stem}.shards", set()))
        # decode with empty stand-ins: a missing tensor or a malformed marker fails here, not mid-load
        _decode(structure, dict.fromkeys(tensors, torch.empty(0)), path)
