"""read_manifest's verification hashes large files on threads: the same files pass, the same errors
are raised, and the first failure in the manifest's order is the one named."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import xxhash

import ember.strategies.checkpoint_io as checkpoint_io
from ember.strategies.checkpoint_io import CheckpointError, read_manifest, write_manifest, write_tree
from ember.strategies.digests import DIGEST


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file counts as large (hashed on the threads); the threads that hashed are recorded."""
    names: list[str] = []
    hash_file = checkpoint_io.hash_file

    def recorded(path: Path, algorithm: str = DIGEST) -> str:
        names.append(threading.current_thread().name)
        return hash_file(path, algorithm)

    monkeypatch.setattr(checkpoint_io, "_PARALLEL_HASH_BYTES", 0)
    monkeypatch.setattr(checkpoint_io, "hash_file", recorded)  # as read_manifest looks it up
    return names


def _checkpoint(directory: Path) -> Path:
    directory.mkdir()
    for stem in ("a", "b", "c"):
        write_tree(directory, stem, {"w": torch.randn(64, 64), "step": 1})
    write_manifest(directory, {"counts": {}, "world_size": 1})
    return directory


def _flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_threads_hash_every_file_and_a_sound_checkpoint_passes(tmp_path: Path, threaded: list[str]) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    threaded.clear()  # write_manifest hashes too
    files = read_manifest(ckpt)["files"]
    assert len(threaded) == len(files) == 6
    assert all(name.startswith("ember-verify") for name in threaded)
    for name, entry in files.items():
        assert entry["xxh3_128"] == xxhash.xxh3_128((ckpt / name).read_bytes()).hexdigest()


def test_an_altered_or_truncated_file_is_named(tmp_path: Path, threaded: list[str]) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    _flip(ckpt / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*does not match its XXH3-128 digest"):
        read_manifest(ckpt)
    (ckpt / "b.safetensors").write_bytes((ckpt / "b.safetensors").read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*truncated"):
        read_manifest(ckpt)


def test_the_first_failure_in_order_is_named(tmp_path: Path, threaded: list[str]) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    _flip(ckpt / "a.safetensors")  # altered, listed first
    (ckpt / "c.safetensors").write_bytes(b"")  # truncated, listed later
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*does not match its XXH3-128 digest"):
        read_manifest(ckpt)

    ckpt = _checkpoint(tmp_path / "ckpt2")
    _flip(ckpt / "c.safetensors")
    (ckpt / "extra.json").write_text("{}")  # unlisted: checked after every digest
    with pytest.raises(CheckpointError, match=r"c\.safetensors.*does not match its XXH3-128 digest"):
        read_manifest(ckpt)
    (ckpt / "c.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"c\.safetensors.*missing"):
        read_manifest(ckpt)

    ckpt = _checkpoint(tmp_path / "ckpt3")
    (ckpt / "extra.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"extra\.json.*not listed in the manifest"):
        read_manifest(ckpt)
