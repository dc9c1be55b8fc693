"""Where a checkpoint directory lives: the crash-safe swap into place, and recovery after a kill.

A save writes into a temporary sibling (:func:`prepare_staging`), and :func:`finalize_staged`
fsyncs it and swaps it into place only when complete, atomically where the OS can. A save killed
at any point leaves the old or the new checkpoint loadable, and :func:`locate_checkpoint` finds
it. :func:`copy_checkpoint` and :func:`remove_checkpoint` change checkpoints the same way: never
seen half copied or half deleted. The files themselves and their manifest are
:mod:`ember.strategies.checkpoint_io`'s.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.strategies.checkpoint_io import MANIFEST, CheckpointError, _fsync, read_manifest
from ember.strategies.digests import noted

__all__ = [
    "check_target",
    "copy_checkpoint",
    "finalize_staged",
    "locate_checkpoint",
    "prepare_staging",
    "remove_checkpoint",
    "staging_path",
]


def locate_checkpoint(directory: Path) -> Path:
    """The complete checkpoint saved at ``directory``: ``directory`` itself, or, where a save was
    killed while it replaced ``directory`` on a file system without an atomic swap, the complete
    copy it left beside it (the new one, ``.<name>.partial``, else the old one, ``.<name>.old``).

    Returns ``directory`` when nothing else is complete (loading it then raises the usual error).
    """
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return directory
    for candidate in (staging_path(directory), _aside_path(directory)):
        if _is_complete(candidate):
            return candidate
    return directory


def _is_complete(directory: Path) -> bool:
    """Cheap check that ``directory`` holds a whole checkpoint: a manifest, and every file it lists
    at its listed size (loading verifies the checksums)."""
    try:
        manifest = read_manifest(directory, verify=False)
        return all((directory / n).stat().st_size == e["size"] for n, e in manifest["files"].items())
    except (CheckpointError, OSError):
        return False


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
    checkpoint, never a mix. What an earlier, killed save left is settled first: if it died between
    the two renames of the fallback swap (``directory`` missing), its complete copy is moved back to
    ``directory``; every other leftover is debris and removed.
    """
    staging, aside = staging_path(directory), _aside_path(directory)
    if not (directory / MANIFEST).is_file() and not (directory.exists() and any(directory.iterdir())):
        found = locate_checkpoint(directory)
        if found != directory:
            if directory.exists():
                directory.rmdir()  # an empty directory takes no part in a checkpoint
            os.replace(found, directory)
            _fsync(directory.parent)
    for debris in (staging, aside):
        if debris.exists():
            shutil.rmtree(debris)  # debris: a complete checkpoint, if there was one, is at directory now
    staging.mkdir(parents=True)
    return staging


def staging_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.partial")


def _aside_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def finalize_staged(staging: Path, directory: Path) -> None:
    """Make the complete checkpoint ``staging`` the one at ``directory`` (one rank only).

    Order matters: every file and folder of ``staging`` is fsynced first, so the swap never exposes
    data still in flight. Where the OS can swap two directories atomically (Linux
    ``renameat2(RENAME_EXCHANGE)``), ``directory`` holds the old or the new checkpoint at every
    instant. Elsewhere the old one is renamed aside to ``.<name>.old`` first; while ``directory``
    is missing, :func:`locate_checkpoint` finds the complete copy beside it.
    """
    _sync_tree(staging)
    if directory.exists() and _exchange(staging, directory):
        _fsync(directory.parent)
        shutil.rmtree(staging)  # now the old checkpoint
        return
    aside = _aside_path(directory)
    if directory.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(directory, aside)
    os.replace(staging, directory)
    _fsync(directory.parent)
    if aside.exists():
        shutil.rmtree(aside)


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint so that it is never seen half deleted: it is renamed to a hidden name
    first (which no loader looks at), then removed, with what earlier killed removals left."""
    trash = directory.with_name(f".{directory.name}.removed")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(directory, trash)
    _fsync(directory.parent)
    shutil.rmtree(trash)
    for debris in directory.parent.glob(".*.removed"):
        shutil.rmtree(debris, ignore_errors=True)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a checkpoint identical to the complete checkpoint ``source`` (one rank only).

    Files are hard-linked where the file system allows (a finished checkpoint's files are never
    changed in place: a new save replaces the directory), else copied; the manifest comes last, so
    the copy is complete once it has one. The swap into place is the same atomic one as a save's.
    """
    read_manifest(source, verify=False)
    check_target(target)
    staging = prepare_staging(target)
    last = source / MANIFEST
    for path in sorted(source.rglob("*"), key=lambda p: (p == last, p.as_posix())):
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


def _sync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory from the deepest up (their entries).
    A file this process fsynced since its last write is durable already (a rename since then is a
    change to its directory, synced here): it is not fsynced again."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            if not noted(Path(folder, name), forget=True)[0]:
                _fsync(Path(folder, name))
        _fsync(Path(folder))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Any = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the OS or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. NFS, old kernels
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
