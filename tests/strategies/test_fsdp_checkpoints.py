"""FSDP checkpoints: sharded by default (each rank writes its own shards), pickle-free, portable
across world sizes and strategies; ``ember consolidate``; streamed ``save_model``; hybrid sharding."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_command, run_processes
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ember import Accelerator, cli
from ember.strategies import FSDPConfig, FSDPStrategy
from ember.strategies.optim_state import owner_module


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 24), nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Block(), Block(), nn.Linear(6, 1))  # odd sizes: uneven shards


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]


def _flat_state(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full weights and name-keyed optimizer tensors as lists (on the main process)."""
    strategy = accelerator.strategy
    weights = strategy.module_state_dict(model)
    optim = strategy.optimizer_state_dict(optimizer.optimizer, owner_module([model], optimizer.optimizer))  # type: ignore[attr-defined]
    if not accelerator.is_main_process:
        return {}
    out = {f"model/{k}": v.flatten().tolist() for k, v in weights.items()}
    for name, per_param in optim["state"].items():
        for key, value in per_param.items():
            out[f"optim/{name}/{key}"] = torch.as_tensor(value).flatten().tolist()
    out["groups"] = [{k: v for k, v in g.items() if k in ("lr", "params")} for g in optim["param_groups"]]
    return out


def _save_worker(directory: str, strategy: str) -> dict:
    accelerator = Accelerator(
        strategy=FSDPStrategy(FSDPConfig(wrap={Block})) if strategy == "fsdp" else strategy
    )
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    for x, y in _batches():
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(directory)
    local = {n: list(p.to_local().shape) for n, p in model.named_parameters()} if strategy == "fsdp" else {}
    return {"state": _flat_state(accelerator, model, optimizer), "local": local}


def _load_worker(directory: str, strategy: str) -> dict:
    accelerator = Accelerator(strategy=strategy)
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.5))
    accelerator.load_state(directory)
    state = _flat_state(accelerator, model, optimizer)
    x, y = _batches()[0]  # the restored optimizer keeps working
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.step()
    return state


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert actual["groups"] == expected["groups"]
    for key in expected:
        if key != "groups":
            torch.testing.assert_close(torch.tensor(actual[key]), torch.tensor(expected[key]), msg=key)


def test_sharded_checkpoint_is_per_rank_pickle_free_and_portable(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    saved = run_processes(_save_worker, str(ckpt), "fsdp", nprocs=2)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["world_size"] == 2
    assert all(name.endswith((".json", ".safetensors")) for name in manifest["files"])  # nothing to unpickle
    # Each rank wrote one file holding exactly its own shard of every parameter: nobody gathered.
    files = sorted((ckpt / "model.shards").iterdir())
    assert len(files) == 2
    for rank, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        assert shapes == saved[rank]["local"]
    expected = saved[0]["state"]
    # ... loads on 1 process, into DDP on 2, into FSDP on 2: same weights and optimizer state.
    _assert_same(_load_worker(str(ckpt), "auto"), expected)
    for strategy in ("ddp", "fsdp"):
        _assert_same(run_processes(_load_worker, str(ckpt), strategy, nprocs=2)[0], expected)


def test_full_checkpoint_of_ddp_loads_into_fsdp(tmp_path: Path) -> None:
    ckpt = tmp_path / "ddp"
    saved = run_processes(_save_worker, str(ckpt), "ddp", nprocs=2)[0]["state"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "full"
    optimizer_file = json.loads((ckpt / "optimizer.json").read_text())
    assert optimizer_file["param_groups"][0]["params"][0] == "0.weight"  # keyed by name, not position
    _assert_same(run_processes(_load_worker, str(ckpt), "fsdp", nprocs=2)[0], saved)
    # and a full checkpoint written by FSDP (state_dict_type="full") loads on one process
    fsdp_full = tmp_path / "fsdp_full"
    run_processes(_full_save_worker, str(fsdp_full), nprocs=2)
    assert json.loads((fsdp_full / "manifest.json").read_text())["layout"] == "full"
    assert set(load_file(str(fsdp_full / "model.safetensors"))) == set(_model().state_dict())
    _load_worker(str(fsdp_full), "auto")


def _full_save_worker(directory: str) -> None:
    accelerator = Accelerator(strategy=FSDPStrategy(FSDPConfig(state_dict_type="full")))
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    accelerator.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    accelerator.save_state(directory)


def _save_model_worker(directory: str) -> dict:
    accelerator = Accelerator(strategy="fsdp")
    model = accelerator.prepare(_model())
    accelerator.save_model(model, Path(directory) / "one")
    accelerator.save_model(model, Path(directory) / "split", max_shard_size=400)  # bytes: several files
    full = accelerator.strategy.module_state_dict(model)
    return {k: v.tolist() for k, v in full.items()} if accelerator.is_main_process else {}


def test_save_model_and_consolidate_write_the_full_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = run_processes(_save_model_worker, str(tmp_path), nprocs=2)[0]
    expected = {k: torch.tensor(v) for k, v in full.items()}
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    torch.testing.assert_close(one, expected, rtol=0, atol=0)
    index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
    split = {}
    for name in set(index["weight_map"].values()):
        split.update(load_file(str(tmp_path / "split" / name)))
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(split, expected, rtol=0, atol=0)

    ckpt = tmp_path / "ckpt"
    saved = run_processes(_save_worker, str(ckpt), "fsdp", nprocs=2)[0]["state"]
    out = tmp_path / "out" / "model.safetensors"
    result = run_command([sys.executable, "-m", "ember", "consolidate", str(ckpt), str(out)])
    assert result.returncode == 0, result.stderr
    assert "wrote 12 tensors" in result.stdout
    consolidated = load_file(str(out))
    for name, tensor in consolidated.items():
        assert tensor.flatten().tolist() == saved[f"model/{name}"]
    # loads into a plain model
    _model().load_state_dict(consolidated)
    # the same, in memory, for TrainModule.load_from_checkpoint (no process group)
    from ember._weights import full_state_dict
    from ember.strategies.checkpoint_io import read_manifest

    torch.testing.assert_close(full_state_dict(ckpt, read_manifest(ckpt)), consolidated, rtol=0, atol=0)
    # bad input: clear errors, nothing written (in-process: the same argument checks)
    for argv, message in [
        ([str(ckpt), str(out)], "exists; pass --force"),
        ([str(tmp_path / "nope"), str(tmp_path / "x")], "does not exist"),
        (["--model", "3", str(ckpt), str(tmp_path / "x")], r"--model 3 is not in \[0, 1\)"),
        ([str(ckpt), str(tmp_path)], "is a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["consolidate", *argv])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    assert cli.main(["consolidate", "--force", str(ckpt), str(out)]) == 0


def _hybrid_worker(directory: str) -> dict:
    accelerator = Accelerator(strategy=FSDPStrategy(FSDPConfig(wrap={Block})))  # 2 nodes: hybrid by default
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    mesh = accelerator.strategy.device_mesh  # type: ignore[attr-defined]
    for x, y in _batches():
        # every rank takes its quarter of the batch
        part = slice(accelerator.process_index * 2, accelerator.process_index * 2 + 2)
        accelerator.backward(F.mse_loss(model(x[part]), y[part]))
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(directory)
    weights = accelerator.strategy.module_state_dict(model)
    return {
        "mesh": list(mesh.shape), "names": list(mesh.mesh_dim_names),
        "local": list(model[0].weight.to_local().shape),
        "params": {k: v.flatten().tolist() for k, v in weights.items()} if accelerator.is_main_process else {},
    }  # fmt: skip


def test_hybrid_sharding_on_two_nodes_matches_one_process(tmp_path: Path) -> None:
    ranks = run_processes(_hybrid_worker, str(tmp_path / "ckpt"), nprocs=4, nodes=2)
    for rank in ranks:
        assert rank["mesh"] == [2, 2] and rank["names"] == ["replicate", "shard"]
        assert rank["local"] == [3, 4]  # 6 rows sharded over the 2 ranks of a node, replicated across nodes
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches():
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    # The 4 gradients are averaged in another order than one backward over the batch: fp32 rounding.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(ranks[0]["params"][name]).view_as(value), value, rtol=1e-5, atol=1e-6
        )
    accelerator = Accelerator()
    restored = _model()
    restored = accelerator.prepare(restored, torch.optim.SGD(restored.parameters(), lr=0.1))[0]
    accelerator.load_state(tmp_path / "ckpt")
    for name, value in restored.state_dict().items():
        assert value.flatten().tolist() == ranks[0]["params"][name]
