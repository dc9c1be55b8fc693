"""The streamed safetensors writer and name-keyed optimizer state (single process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ember.strategies.optim_state import parameter_names, to_indexed, to_named
from ember.strategies.sharded_io import SafetensorsWriter, load_shards, save_shards, shard_metadata


def test_writer_streams_a_file_safetensors_reads_back(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "half": torch.randn(7).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "view": torch.arange(12).view(3, 4).t(),  # not contiguous
    }
    path = tmp_path / "t.safetensors"
    with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_writer_refuses_surprises_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=r"expected \('a', torch.float32, \(2,\)\)"):
        with SafetensorsWriter(path, [("a", torch.float32, (2,))]) as writer:
            writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match=r"closed before writing \['b'\]"):
        with SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (1,))]) as writer:
            writer.write("a", torch.zeros(2))
    with pytest.raises(TypeError, match="complex64"):
        SafetensorsWriter(path, [("c", torch.complex64, (1,))])
    assert list(tmp_path.iterdir()) == []


def test_shards_round_trip_in_one_process(tmp_path: Path) -> None:
    state = {"a": torch.randn(4, 2), "b": torch.arange(3)}
    save_shards(tmp_path / "s", state)
    assert shard_metadata(tmp_path / "s") == {"a": (torch.float32, (4, 2)), "b": (torch.int64, (3,))}
    target = {"a": torch.zeros(4, 2)}
    loaded = load_shards(tmp_path / "s", target)
    assert torch.equal(target["a"], state["a"])  # filled in place
    assert torch.equal(loaded["b"], state["b"])  # no target: returned as a new tensor
    with pytest.raises(RuntimeError, match=r"has no tensors \['c'\]"):
        load_shards(tmp_path / "s", {"c": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"'a' has shape \[4, 2\] in .* but \[2, 4\] here"):
        load_shards(tmp_path / "s", {"a": torch.zeros(2, 4)})


def test_optimizer_state_by_name_round_trips_and_names_mismatches() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}], lr=0.01
    )
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    names = parameter_names(model, optimizer)
    assert names == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]
    named = to_named(optimizer.state_dict(), names)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert named["param_groups"][1]["lr"] == 0.1
    indexed = to_indexed(named, names)
    assert indexed["param_groups"] == optimizer.state_dict()["param_groups"]
    assert indexed["state"].keys() == optimizer.state_dict()["state"].keys()
    with pytest.raises(
        ValueError, match=r"missing parameters \['2.weight'\]; unexpected parameters \['1.bias'\]"
    ):
        to_indexed(named, [["0.weight", "0.bias"], ["1.weight", "2.weight"]])
    other = torch.optim.SGD(nn.Linear(1, 1).parameters())
    assert parameter_names(model, other) is None  # not this model's parameters


def test_manifest_digests_of_written_files_match_their_bytes(tmp_path: Path) -> None:
    # SafetensorsWriter hashes what it writes and the manifest reuses that digest; a file changed
    # after it was written is read and hashed again.
    import os

    import xxhash

    from ember.strategies.checkpoint_io import read_manifest, read_tree, write_manifest, write_tree

    state = {"w": torch.randn(5, 3), "step": 7, "z": torch.tensor([1 + 2j], dtype=torch.complex64)}
    names = write_tree(tmp_path, "tree", state)  # complex64: safetensors' own writer, hashed by the manifest
    with SafetensorsWriter(tmp_path / "a.safetensors", [("a", torch.float32, (4,))]) as writer:
        writer.write("a", torch.arange(4.0))
    with SafetensorsWriter(tmp_path / "b.safetensors", [("b", torch.float32, (4,))]) as writer:
        writer.write("b", torch.arange(4.0))
    stat = os.stat(tmp_path / "b.safetensors")
    with SafetensorsWriter(tmp_path / "c.safetensors", [("b", torch.float32, (4,))]) as writer:
        writer.write("b", torch.ones(4))
    os.replace(tmp_path / "c.safetensors", tmp_path / "b.safetensors")  # same size, new contents
    os.utime(tmp_path / "b.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_manifest(tmp_path, {"counts": {}, "world_size": 1})
    files = read_manifest(tmp_path)["files"]
    assert sorted(files) == sorted([*names, "a.safetensors", "b.safetensors"])
    for name, entry in files.items():
        assert entry == {
            "size": entry["size"],
            "xxh3_128": xxhash.xxh3_128((tmp_path / name).read_bytes()).hexdigest(),
        }, name
    loaded = read_tree(tmp_path, "tree")
    assert (
        torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["z"], state["z"]) and loaded["step"] == 7
    )


def test_final_sync_skips_only_files_unchanged_since_their_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before a checkpoint is swapped into place every file must be durable: one that this process
    # fsynced when it wrote it is not fsynced again, unless it changed since.
    import ember.strategies.checkpoint_io as checkpoint_io
    import ember.strategies.checkpoint_swap as checkpoint_swap

    synced: list[str] = []

    def fsync(path: Path) -> None:  # files only: folders are always synced
        if Path(path).is_file():
            synced.append(Path(path).name)

    monkeypatch.setattr(checkpoint_swap, "_fsync", fsync)
    checkpoint_io.write_json(tmp_path / "kept.json", {"a": 1})
    checkpoint_io.write_json(tmp_path / "changed.json", {"a": 1})
    with open(tmp_path / "changed.json", "a") as f:
        f.write(" ")  # written after its fsync
    (tmp_path / "foreign.bin").write_bytes(b"x")  # not written by ember
    with SafetensorsWriter(tmp_path / "t.safetensors", [("a", torch.float32, (2,))]) as writer:
        writer.write("a", torch.zeros(2))
    checkpoint_swap._sync_tree(tmp_path)
    assert sorted(synced) == ["changed.json", "foreign.bin"]
    synced.clear()
    checkpoint_swap._sync_tree(tmp_path)  # a note serves once
    assert sorted(synced) == ["changed.json", "foreign.bin", "kept.json", "t.safetensors"]


def test_safetensors_and_xxhash_load_at_the_first_save_not_at_import(tmp_path: Path) -> None:
    # Start-up (benchmarks/startup.py): a run that never saves or loads a checkpoint does not import
    # the checkpoint file libraries.
    import subprocess

    from dist_helpers import PYTHON, REPO, base_env

    code = (
        "import sys, torch\n"
        "from ember import Accelerator, Trainer, TrainModule\n"
        "Trainer(max_epochs=1, accelerator='cpu')\n"
        "accelerator = Accelerator(accelerator='cpu')\n"
        "model = accelerator.prepare(torch.nn.Linear(2, 2))\n"
        "print(sorted(m for m in ('safetensors', 'xxhash') if m in sys.modules))\n"
        f"accelerator.load_state(accelerator.save_state({str(tmp_path / 'ckpt')!r}))\n"
        "print(sorted(m for m in ('safetensors', 'xxhash') if m in sys.modules))\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, env=base_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['safetensors', 'xxhash']"]
