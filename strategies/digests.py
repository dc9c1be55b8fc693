"""File digests for checkpoint manifests, and the files this process has already fsynced.

A manifest lists every file of a checkpoint with its digest (:data:`DIGEST`, XXH3-128; version-1
manifests hold SHA-256). A file this process has just written and fsynced is noted with its digest
(:func:`note_synced`): the manifest takes the digest from the note instead of reading the file
again, and the sync before a checkpoint is swapped into place skips it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import xxhash

__all__ = ["DIGEST", "DIGESTS", "file_digest", "hash_file", "note_synced", "noted", "sync_and_digest"]


class _Hash(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


# The digest of every file a manifest lists: the entry's key -> (new hash object, the name errors use).
# New manifests record DIGEST; a manifest entry is verified with the algorithm its key names. A
# non-cryptographic 128-bit hash (~10x SHA-256's speed) is enough: the digests detect corruption and
# truncation, not tampering (whoever can change a file can change the manifest next to it).
DIGESTS: dict[str, tuple[Callable[[], _Hash], str]] = {
    "xxh3_128": (xxhash.xxh3_128, "XXH3-128 digest"),
    "sha256": (hashlib.sha256, "SHA-256"),  # version-1 manifests
}
DIGEST = "xxh3_128"


def hash_file(path: Path, algorithm: str = DIGEST) -> str:
    """The hex digest of the file at ``path`` with ``algorithm`` (a key of :data:`DIGESTS`)."""
    # One buffer, refilled in place: ~7% faster than a new bytes object per block.
    digest, buffer = DIGESTS[algorithm][0](), bytearray(1 << 18)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def sync_and_digest(path: Path, fd: int) -> str:
    """fsync ``fd``, the open file ``path``, and return the file's :data:`DIGEST`. The file is read back
    (from the page cache) and hashed on a second thread while the fsync waits for the disk: a
    large file's save then costs about the longer of the two, not their sum."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(hash_file, path)
        os.fsync(fd)
        return digest.result()


# Files this process wrote and fsynced (write_json, SafetensorsWriter), by path, with the inode,
# size and mtime they had then and their DIGEST when it was computed as they were saved. A note
# holds only while the file is unchanged. The manifest then takes the digest without reading the
# file again, and the sync before a checkpoint is swapped into place does not fsync it a second time.
_SYNCED: dict[str, tuple[tuple[int, int, int], str | None]] = {}
_SYNCED_MAX = 4096


def note_synced(path: Path, digest: str | None = None) -> None:
    """Record that the file at ``path`` was just fsynced, with its :data:`DIGEST` if known."""
    stat, key = os.stat(path), os.path.abspath(path)
    _SYNCED.pop(key, None)
    _SYNCED[key] = ((stat.st_ino, stat.st_size, stat.st_mtime_ns), digest)
    while len(_SYNCED) > _SYNCED_MAX:  # files never synced again nor listed (save_model's)
        del _SYNCED[next(iter(_SYNCED))]


def noted(path: Path, forget: bool = False) -> tuple[bool, str | None]:
    """(whether ``path`` is unchanged since this process fsynced it, its :data:`DIGEST` if known then)."""
    key = os.path.abspath(path)
    note = _SYNCED.pop(key, None) if forget else _SYNCED.get(key)
    stat = os.stat(path)
    if note is None or note[0] != (stat.st_ino, stat.st_size, stat.st_mtime_ns):
        return False, None
    return True, note[1]


def file_digest(path: Path) -> str:
    """The :data:`DIGEST` of ``path``: the one noted when this process saved it, else read and hashed."""
    return noted(path)[1] or hash_file(path)
