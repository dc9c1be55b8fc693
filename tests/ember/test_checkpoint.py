"""save_state / load_state in one process: exact resume, pickle-free loading, verification, safety."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from torch import nn
from workers import check_resume, resume_worker

from ember import Accelerator, CheckpointError
from ember.strategies.checkpoint_io import decode_tree, encode_tree


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_resume_mid_epoch_is_bit_exact(tmp_path: Path, precision: str) -> None:
    ckpt = str(tmp_path / "ckpt")
    full = resume_worker(ckpt, "full", precision=precision)
    first = resume_worker(ckpt, "first", stop_at=14, precision=precision)
    resumed = resume_worker(ckpt, "resume", precision=precision)
    assert full["epoch_len"] == 11  # 44 samples / 4; stop_at=14 is mid-epoch 1
    check_resume(full, first, resumed, stop_at=14)


def _saved(tmp_path: Path) -> tuple[Accelerator, nn.Module, Path]:
    accelerator = Accelerator(precision="16-mixed")
    model = nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(torch.randn(2, 3)).sum())
    optimizer.step()
    return accelerator, model, accelerator.save_state(tmp_path / "ckpt")


def test_checkpoint_is_json_and_safetensors_and_loads_without_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator, model, ckpt = _saved(tmp_path)
    suffixes = {p.suffix for p in ckpt.iterdir()}
    assert suffixes == {".json", ".safetensors"}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_state unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    accelerator.load_state(ckpt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])


def test_altered_or_truncated_files_are_named(tmp_path: Path) -> None:
    accelerator, _, ckpt = _saved(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not match its XXH3-128 digest"):
        accelerator.load_state(ckpt)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        accelerator.load_state(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        accelerator.load_state(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        accelerator.load_state(tmp_path / "nowhere")


def test_new_manifests_list_xxh3_128_digests(tmp_path: Path) -> None:
    _, _, ckpt = _saved(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["files"]
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, name


def _as_version_1(ckpt: Path) -> None:
    """Rewrite ``ckpt``'s manifest as an earlier ember wrote it: version 1, SHA-256 entries."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["version"] = 1
    manifest["files"] = {
        name: {"size": entry["size"], "sha256": hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}
        for name, entry in manifest["files"].items()
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_checkpoints_with_sha256_manifests_still_load_and_are_verified(tmp_path: Path) -> None:
    accelerator, model, ckpt = _saved(tmp_path)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _as_version_1(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    accelerator.load_state(ckpt)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-3.0)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*does not match its SHA-256 in the manifest"
    ):
        accelerator.load_state(ckpt)
    assert all(torch.all(p == -3.0) for p in model.parameters())  # refused before anything loaded
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        accelerator.load_state(ckpt)


def test_a_manifest_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    accelerator, _, ckpt = _saved(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["version"] = 3
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest version 3; this ember reads versions 1 to 2"):
        accelerator.load_state(ckpt)


def test_save_never_overwrites_user_files(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    accelerator = Accelerator()
    accelerator.prepare(nn.Linear(2, 2))
    with pytest.raises(FileExistsError, match="not an ember checkpoint"):
        accelerator.save_state(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging debris


def test_save_replaces_an_older_checkpoint(tmp_path: Path) -> None:
    accelerator, model, ckpt = _saved(tmp_path)
    with torch.no_grad():
        model.weight.fill_(7.0)
    accelerator.save_state(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(ckpt)
    assert torch.all(model.weight == 7.0)


def test_load_with_different_objects_is_refused(tmp_path: Path) -> None:
    _, _, ckpt = _saved(tmp_path)
    other = Accelerator()
    other.prepare(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="holds 1 optimizers, but this Accelerator has 0"):
        other.load_state(ckpt)


def test_tree_codec_round_trip() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, 1: {}},
        "param_groups": [
            {"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "nesterov": False, "foo": None}
        ],
        "__tricky__": {"__tensor__": "not a marker"},
        "np": np.arange(3, dtype=np.uint32),
        "inf": math.inf,
        "nested": [(1, "a"), [2.5]],
    }
    structure, tensors = encode_tree(state)
    back = decode_tree(structure, tensors)
    assert back["state"][0]["exp_avg"].tolist() == [1.0, 1.0] and set(back["state"]) == {0, 1}
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["__tricky__"] == {"__tensor__": "not a marker"}
    assert back["np"].tolist() == [0, 1, 2] and back["inf"] == math.inf
    assert back["nested"] == [(1, "a"), [2.5]]
    with pytest.raises(TypeError, match=r"cannot store object at '\.bad\.0'"):
        encode_tree({"bad": [object()]})


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every fsync from now on, in the order they finish: (inode, whether a folder), on any thread."""
    import os
    import stat

    done: list[tuple[int, bool]] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        fsync(fd)
        info = os.fstat(fd)
        done.append((info.st_ino, stat.S_ISDIR(info.st_mode)))

    monkeypatch.setattr(os, "fsync", recorded)
    return done


def test_save_state_fsyncs_each_file_once_before_the_manifest_and_reads_none_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Durable when save_state returns, and no slower than it must be: every file is fsynced once
    # (a second fsync is one more journal commit), all of them before the manifest that names them,
    # the manifest before the swap; and no file is read back to hash it (the writers hash the
    # bytes they write).
    import ember.strategies.digests as digests

    accelerator, model, ckpt = _saved(tmp_path)
    read_back: list[Path] = []
    hash_file = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda path, *a: read_back.append(path) or hash_file(path, *a))
    synced = _fsyncs(monkeypatch)
    accelerator.save_state(ckpt)
    files = {p.stat().st_ino: p.name for p in ckpt.iterdir()}
    order = [files[ino] for ino, folder in synced if not folder]
    assert sorted(order) == sorted(files.values()) and len(order) == len(set(order)), order
    assert order[-1] == "manifest.json"
    folders = [ino for ino, folder in synced if folder]
    assert folders[-2:] == [ckpt.stat().st_ino, tmp_path.stat().st_ino]  # its entries, then the swap
    assert read_back == []
    model.weight.data.zero_()
    accelerator.load_state(ckpt)  # and the digests are right


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names an fd's file through /proc/self/fd")
def test_a_failed_fsync_fails_the_save_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsyncs may run on other threads while the save goes on: an error there still fails save_state,
    # before the new checkpoint replaces the old one.
    import os

    accelerator, model, ckpt = _saved(tmp_path)
    before = model.weight.detach().clone()
    fsync = os.fsync

    def failing(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith((".optimizer", "optimizer")):
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="Input/output error"):
        accelerator.save_state(ckpt)
    monkeypatch.setattr(os, "fsync", fsync)
    accelerator.load_state(ckpt)
    assert torch.equal(model.weight, before)
