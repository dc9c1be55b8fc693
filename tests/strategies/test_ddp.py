"""DDPStrategy options and the subprocess launcher (devices=N from a plain `python script.py`)."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import PYTHON, base_env, run_command, run_processes
from torch import nn

from ember import Accelerator
from ember.strategies import DDPConfig, DDPStrategy


class _PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _config_worker() -> dict:
    strategy = DDPStrategy(DDPConfig(find_unused_parameters=True, bucket_cap_mb=1.0))
    accelerator = Accelerator(strategy=strategy)
    prepared = accelerator.prepare(_PartlyUsed())
    for _ in range(2):  # without find_unused_parameters DDP fails on the second step
        accelerator.backward(prepared(torch.ones(1, 2)).sum())
    total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), "sum")
    mean = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), "mean")
    padded = accelerator.pad_across_processes(torch.ones(accelerator.process_index + 1), pad_index=-1)
    value = accelerator.broadcast(torch.tensor([accelerator.process_index]), from_process=1)
    with accelerator.split_between_processes(list(range(5))) as share:
        mine = share
    order, local = [], []
    with accelerator.main_process_first():
        order.append(time.monotonic())
    with accelerator.local_main_process_first():  # one node: the same as main_process_first
        local.append(time.monotonic())
    ran = [accelerator.on_process(lambda: "one", process_index=1)(), accelerator.on_last_process(lambda: "last")(),
           accelerator.on_local_main_process(lambda: "local")()]  # fmt: skip
    states = [
        sorted(accelerator.get_state_dict(prepared)),
        sorted(accelerator.get_state_dict(prepared, unwrap=False)),
    ]
    accelerator.end_training()
    return {
        "states": states,
        "ran": ran,
        "last": accelerator.is_last_process,
        "local_first": local[0],
        "find_unused": prepared.find_unused_parameters,  # type: ignore[union-attr]
        "backend": strategy.process_group_backend,
        "total": total.item(),
        "mean": mean.item(),
        "padded": padded.tolist(),
        "value": value.item(),
        "share": mine,
        "first": order[0],
    }


def test_ddp_config_and_collectives() -> None:
    ranks = run_processes(_config_worker, nprocs=2)
    assert all(r["find_unused"] and r["backend"] == "gloo" for r in ranks)
    assert [r["total"] for r in ranks] == [3.0, 3.0] and [r["mean"] for r in ranks] == [1.5, 1.5]
    assert ranks[0]["padded"] == [1.0, -1.0] and ranks[1]["padded"] == [1.0, 1.0]
    assert [r["value"] for r in ranks] == [1, 1]
    assert ranks[0]["share"] == [0, 1, 2] and ranks[1]["share"] == [3, 4]
    assert ranks[0]["first"] < ranks[1]["first"]  # the main process ran the block first
    assert ranks[0]["local_first"] < ranks[1]["local_first"]
    assert ranks[0]["ran"] == [None, None, "local"] and ranks[1]["ran"] == ["one", "last", None]
    assert [r["last"] for r in ranks] == [False, True]
    assert ranks[0]["states"][0] == ["unused.bias", "unused.weight", "used.bias", "used.weight"]
    assert ranks[0]["states"][1] == ["module." + name for name in ranks[0]["states"][0]]  # DDP's own names


def _forward_watch_worker() -> dict:
    accelerator = Accelerator(strategy="ddp")
    plain = accelerator.prepare(nn.Linear(2, 2))
    normed = accelerator.prepare(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    hooks = {"plain": len(plain._forward_pre_hooks), "buffers": len(normed._forward_pre_hooks)}
    normed(torch.randn(4, 2)).sum().backward()  # the watched forward: its region opens and closes
    plain(torch.randn(4, 2)).sum().backward()
    accelerator.end_training()
    return hooks


def test_ddp_forward_is_watched_only_when_it_broadcasts_buffers() -> None:
    # The watchdog times DDP's forward (its buffer broadcast) through module hooks, which cost every
    # call; a module without buffers communicates nothing in its forward and gets none.
    assert run_processes(_forward_watch_worker, nprocs=2) == [{"plain": 0, "buffers": 1}] * 2


def test_devices_from_plain_python_starts_the_other_ranks(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, torch
        from ember import Accelerator
        accelerator = Accelerator(devices=2)
        total = accelerator.reduce(torch.tensor([1.0]), "sum").item()
        with open({str(tmp_path)!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
            json.dump({{"world": accelerator.num_processes, "total": total, "argv": sys.argv[1:]}}, f)
    """)
    )
    result = run_command([PYTHON, str(script), "--flag"], timeout=120)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "world": 2,
            "total": 2.0,
            "argv": ["--flag"],
        }


def test_failing_rank_stops_the_job(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(
        textwrap.dedent("""
        import time, torch
        from ember import Accelerator
        accelerator = Accelerator(devices=2)
        if accelerator.process_index == 1:
            raise SystemExit(3)
        time.sleep(300)  # rank 0 would sit here (or in a collective) without the launcher's watch
    """)
    )
    start = time.monotonic()
    result = run_command([PYTHON, str(script)], timeout=120, env=base_env())
    assert result.returncode == 3
    assert "rank 1 exited with code 3" in result.stderr
    assert time.monotonic() - start < 60


def test_host_tensors_go_through_the_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    # NCCL sends no host tensor: a collective of one (a flag, a logged Python number) is staged on
    # the process's device and its result comes back. (Checked here on the decision: this machine
    # has no GPU; the "meta" device stands in for it.)
    strategy = DDPStrategy(DDPConfig(process_group_backend="nccl"))
    monkeypatch.setattr(DDPStrategy, "root_device", property(lambda self: torch.device("meta")))
    host = torch.ones(3)
    sent, home = strategy._communicable(host)
    assert sent.device.type == "meta" and home == torch.device("cpu")
    sent, home = strategy._communicable(torch.ones(3, device="meta"))  # already on the device: a copy
    assert sent.device.type == "meta" and home.type == "meta"
    gloo = DDPStrategy(DDPConfig(process_group_backend="gloo"))
    sent, home = gloo._communicable(host)  # gloo sends host tensors: a copy, in place
    assert sent.device == host.device == home and sent is not host and torch.equal(sent, host)
