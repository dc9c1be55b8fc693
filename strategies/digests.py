"""File digests for checkpoint manifests, and the files this process has already fsynced.

A manifest lists every file of a checkpoint with its digest (:data:`DIGEST`, XXH3-128; version-1
manifests hold SHA-256). The writers (``write_json``, ``SafetensorsWriter``) hash the bytes as they
write them and hand the file to :func:`make_durable`, which notes it with its digest once it is
fsynced (:func:`note_synced`): the manifest takes the digest from the note instead of reading the
file again, and the sync before a checkpoint is swapped into place skips it. Inside
:func:`deferred_syncs` those fsyncs run on a few threads while the caller writes the next files.

``xxhash`` is imported on the first hash, not with ember: a run that never checkpoints never loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = [
    "DIGEST",
    "DIGESTS",
    "deferred_syncs",
    "file_digest",
    "hash_file",
    "make_durable",
    "new_digest",
    "note_synced",
    "noted",
]


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _xxh3_128() -> _Hash:
    import xxhash  # at the first hash (start-up: see the module's docstring)

    return xxhash.xxh3_128()  # type: ignore[no-any-return]


# The digest of every file a manifest lists: the entry's key -> (new hash object, the name errors use).
# New manifests record DIGEST; a manifest entry is verified with the algorithm its key names. A
# non-cryptographic 128-bit hash (~10x SHA-256's speed) is enough: the digests detect corruption and
# truncation, not tampering (whoever can change a file can change the manifest next to it).
DIGESTS: dict[str, tuple[Callable[[], _Hash], str]] = {
    "xxh3_128": (_xxh3_128, "XXH3-128 digest"),
    "sha256": (hashlib.sha256, "SHA-256"),  # version-1 manifests
}
DIGEST = "xxh3_128"


def new_digest() -> _Hash:
    """A new hash object of :data:`DIGEST`, for a writer to feed the bytes it writes."""
    return DIGESTS[DIGEST][0]()


def hash_file(path: Path, algorithm: str = DIGEST) -> str:
    """The hex digest of the file at ``path`` with ``algorithm`` (a key of :data:`DIGESTS`)."""
    # One buffer, refilled in place: ~7% faster than a new bytes object per block.
    digest, buffer = DIGESTS[algorithm][0](), bytearray(1 << 18)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


# -- fsyncs, now or on threads ---------------------------------------------------------------------
_SYNC_THREADS = 8  # fsyncs wait on the disk, not the CPU: concurrent ones share the journal's commits


class _Syncs:
    """The fsyncs handed over inside one :func:`deferred_syncs` block."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="ember-fsync")
        self.pending: list[tuple[Future[None], Path, str | None]] = []

    def finish(self) -> None:
        """Wait for every fsync; note the synced files; raise the first error after all are done."""
        error: BaseException | None = None
        for future, path, digest in self.pending:
            try:
                future.result()
                note_synced(path, digest)
            except BaseException as err:
                error = error or err
        self.pool.shutdown(wait=True)
        if error is not None:
            raise error


def _sync_and_close(file: BinaryIO) -> None:
    """fsync ``file``, then close it (also when the fsync failed): a worker closes what it synced,
    so a save of many files holds no more open than the workers are syncing."""
    try:
        os.fsync(file.fileno())
    finally:
        file.close()


_DEFERRED: ContextVar[_Syncs | None] = ContextVar("ember_deferred_syncs", default=None)


@contextmanager
def deferred_syncs() -> Iterator[None]:
    """Inside the block, :func:`make_durable` returns at once and its fsync runs on a thread, while
    the caller writes the next file: a save's fsyncs overlap its writing and one another (the
    journal commits concurrent fsyncs together) instead of queueing one after the other. Leaving
    the block waits for every fsync and raises the first that failed, so every file written inside
    is durable (and noted) after it. For files nobody may see before the block ends (a
    checkpoint's staging folder): a file is renamed to its final name before it is durable."""
    if _DEFERRED.get() is not None:  # nested: the outer block waits
        yield
        return
    syncs = _Syncs()
    token = _DEFERRED.set(syncs)
    try:
        yield
    except BaseException:
        _DEFERRED.reset(token)
        try:
            syncs.finish()  # no fsync left running behind the caller's back; the caller's error wins
        except BaseException:
            pass
        raise
    _DEFERRED.reset(token)
    syncs.finish()


def make_durable(file: BinaryIO, path: Path, digest: str | None, final: Path | None = None) -> None:
    """fsync and close ``file`` (written and flushed, open at ``path``), rename it to ``final`` if
    given, and note it (:func:`note_synced`) with its ``digest``. Outside :func:`deferred_syncs` the
    rename comes after the fsync: the file appears at ``final`` complete and durable."""
    syncs = _DEFERRED.get()
    if syncs is None:
        _sync_and_close(file)
        if final is not None:
            os.replace(path, final)
        note_synced(final or path, digest)
        return
    if final is not None:
        try:
            os.replace(path, final)
        except BaseException:
            file.close()
            raise
    syncs.pending.append((syncs.pool.submit(_sync_and_close, file), final or path, digest))


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
