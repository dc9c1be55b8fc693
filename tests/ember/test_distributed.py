"""The Accelerator on 2 real processes (gloo): gradients, accumulation, metrics gathering, resume."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from workers import check_resume, flat_params, resume_worker

from ember import Accelerator


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


# -- DDP gradients == one process over the full batch ----------------------------------------------
def _ddp_grads_worker() -> dict:
    model = _model()
    accelerator = Accelerator()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=4))
    grads = []
    for x, y in loader:
        optimizer.zero_grad()
        accelerator.backward(F.mse_loss(model(x), y))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).tolist())
        optimizer.step()
    return {"strategy": type(accelerator.strategy).__name__, "grads": grads, "params": flat_params(model)}


def test_ddp_gradients_match_single_process_full_batch() -> None:
    ranks = run_processes(_ddp_grads_worker, nprocs=2)
    assert {r["strategy"] for r in ranks} == {"DDPStrategy"}
    assert ranks[0]["params"] == ranks[1]["params"]  # identical on all ranks, bit for bit

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data().tensors
    for step in range(2):  # global step s covers batches 2s (rank 0) and 2s+1 (rank 1) = samples 8s..8s+7
        optimizer.zero_grad()
        F.mse_loss(model(x[8 * step : 8 * step + 8]), y[8 * step : 8 * step + 8]).backward()
        expected = torch.cat([p.grad.flatten() for p in model.parameters()])
        for rank in ranks:
            torch.testing.assert_close(torch.tensor(rank["grads"][step]), expected, rtol=1e-6, atol=1e-7)
        optimizer.step()
    torch.testing.assert_close(
        torch.tensor(ranks[0]["params"]), torch.tensor(flat_params(model)), rtol=1e-6, atol=1e-7
    )


# -- gradient accumulation: no all-reduce on skipped steps, equals one big batch -------------------
def _accumulation_worker() -> dict:
    model = _model()
    accelerator = Accelerator(gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=2))
    fired = []

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations; none here
        fired[-1] = True
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, counting_hook)
    synced, skipped = [], []
    for x, y in loader:
        fired.append(False)
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        synced.append(accelerator.sync_gradients)
        skipped.append(optimizer.step_was_skipped)
    return {"fired": fired, "synced": synced, "skipped": skipped, "params": flat_params(model)}


def test_accumulation_skips_allreduce_and_matches_big_batch() -> None:
    ranks = run_processes(_accumulation_worker, nprocs=2)
    for rank in ranks:
        assert rank["synced"] == [False, True, False, True]
        assert rank["fired"] == rank["synced"]  # the all-reduce ran exactly on the sync steps
        assert rank["skipped"] == [True, False, True, False]
    assert ranks[0]["params"] == ranks[1]["params"]

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data().tensors
    for step in range(2):  # one optimizer step = 2 micro-batches x 2 ranks x 2 samples = samples 8s..8s+7
        optimizer.zero_grad()
        F.mse_loss(model(x[8 * step : 8 * step + 8]), y[8 * step : 8 * step + 8]).backward()
        optimizer.step()
    torch.testing.assert_close(
        torch.tensor(ranks[0]["params"]), torch.tensor(flat_params(model)), rtol=1e-6, atol=1e-7
    )


# -- a model that trains nothing (a frozen teacher) is prepared without DDP --------------------------
def _frozen_teacher_worker(ckpt: str) -> dict:
    student = _model()
    accelerator = Accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(100 + accelerator.process_index)  # each rank its own random teacher ...
    teacher = nn.Sequential(nn.Linear(8, 1), nn.BatchNorm1d(1)).requires_grad_(False).eval()
    before = flat_params(teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student, teacher, optimizer, loader = accelerator.prepare(
        student, teacher, optimizer, DataLoader(_data(), batch_size=2)
    )
    for x, _ in loader:
        with accelerator.accumulate(student, teacher):
            with torch.no_grad():
                target = teacher(x)
            accelerator.backward(F.mse_loss(student(x), target))
            optimizer.step()
            optimizer.zero_grad()
    accelerator.save_state(ckpt)
    accelerator.load_state(ckpt)
    return {"teacher": type(teacher).__name__, "student": type(student).__name__, "before": before,
            "after": flat_params(teacher), "buffers": [b.tolist() for b in teacher.buffers()],
            "params": flat_params(student)}  # fmt: skip


def test_a_frozen_model_is_prepared_without_ddp_and_starts_as_rank_zeros(tmp_path: Path) -> None:
    ranks = run_processes(_frozen_teacher_worker, str(tmp_path / "ckpt"), nprocs=2)
    # DDP refuses a module that trains nothing: it stays as it is ...
    assert [r["teacher"] for r in ranks] == ["Sequential"] * 2
    assert [r["student"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert ranks[0]["before"] != ranks[1]["before"]  # ... made different on each rank,
    assert ranks[0]["after"] == ranks[1]["after"] == ranks[0]["before"]  # ... rank 0's after prepare
    assert ranks[0]["buffers"] == ranks[1]["buffers"]
    assert ranks[0]["params"] == ranks[1]["params"]  # the student trained in step on both ranks


# -- gather_for_metrics sees every sample exactly once ---------------------------------------------
def _gather_worker(n: int, batch_size: int, drop_last: bool) -> dict:
    accelerator = Accelerator()
    dataset = TensorDataset(torch.arange(n), torch.arange(n).float().unsqueeze(1) * 10)
    loader = accelerator.prepare(
        DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    )
    seen, nested, steps, texts = [], [], 0, []
    for _epoch in range(2):
        ids_epoch = []
        for ids, values in loader:
            steps += 1
            gathered = accelerator.gather_for_metrics({"ids": ids, "values": values, "none": None})
            ids_epoch += gathered["ids"].tolist()
            nested.append(bool(torch.equal(gathered["values"].squeeze(1), gathered["ids"].float() * 10)))
            # Decoded predictions (strings) are gathered too, the duplicated last samples dropped.
            texts += accelerator.gather_for_metrics([f"sample {i}" for i in ids.tolist()])
        seen.append(ids_epoch)
    plain = accelerator.gather(torch.tensor([accelerator.process_index]))
    objects = accelerator.gather_object({"rank": accelerator.process_index, "name": ("a", 1)})
    joined = accelerator.gather_object([accelerator.process_index] * (accelerator.process_index + 1))
    try:
        accelerator.gather(["a string"])
        refused = ""
    except TypeError as error:
        refused = str(error)
    try:
        accelerator.gather_object({"tensor": torch.ones(1)})
        unsendable = ""
    except TypeError as error:
        unsendable = str(error)
    return {"seen": seen, "nested_ok": all(nested), "steps": steps, "plain": plain.tolist(), "texts": texts,
            "objects": objects, "joined": joined, "refused": refused, "unsendable": unsendable}  # fmt: skip


def test_gather_for_metrics_returns_each_sample_once() -> None:
    ranks = run_processes(_gather_worker, 13, 2, False, nprocs=2)  # 13 % (2 ranks * 2) != 0
    for rank in ranks:
        assert rank["nested_ok"]
        assert rank["plain"] == [0, 1]
        assert rank["steps"] == ranks[0]["steps"]  # even batches: every rank steps as often
        for epoch_ids in rank["seen"]:
            assert sorted(epoch_ids) == list(range(13))
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]  # reshuffled each epoch
    assert ranks[0]["seen"] == ranks[1]["seen"]
    for rank in ranks:  # strings: each sample once, in the order of the gathered ids
        assert rank["texts"] == [f"sample {i}" for epoch in rank["seen"] for i in epoch]
        assert rank["objects"] == [
            {"rank": 0, "name": ["a", 1]},
            {"rank": 1, "name": ["a", 1]},
        ]  # JSON: a list
        assert rank["joined"] == [0, 1, 1]  # lists from every process, joined
        assert "gather() takes tensors (and dicts, lists, tuples of them); got a str" in rank["refused"]
        assert "Object of type Tensor is not JSON serializable" in rank["unsendable"]


def test_gather_for_metrics_with_drop_last() -> None:
    ranks = run_processes(_gather_worker, 13, 2, True, nprocs=2)
    for epoch_ids in ranks[0]["seen"]:  # 6 full batches = 3 rounds of 2 ranks; the last sample is dropped
        assert len(epoch_ids) == len(set(epoch_ids)) == 12


# -- save_state mid-epoch, load_state, identical continuation ----------------------------------------
def test_resume_mid_epoch_is_bit_exact_on_two_ranks(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    full = run_processes(resume_worker, ckpt, "full", nprocs=2)
    first = run_processes(resume_worker, ckpt, "first", nprocs=2)
    resumed = run_processes(resume_worker, ckpt, "resume", nprocs=2)
    assert (
        full[0]["epoch_len"] == 6
    )  # 44 samples / (4 x 2 ranks) = 5.5 -> 6 even steps; stop_at=7 is mid-epoch 1
    for rank in range(2):
        check_resume(full[rank], first[rank], resumed[rank], stop_at=7)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("rng")) == [
        "rng_rank0.json",
        "rng_rank0.safetensors",
        "rng_rank1.json",
        "rng_rank1.safetensors",
    ]


def _scheduler_worker() -> dict:
    model = _model()
    accelerator = Accelerator()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(_data(), batch_size=2)  # 8 batches before prepare, 4 per rank after
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {"last_epoch": scheduler.last_epoch, "lr": scheduler.get_last_lr()[0]}


def test_scheduler_sized_before_prepare_finishes_with_the_data() -> None:
    for rank in run_processes(_scheduler_worker, nprocs=2):
        assert rank == {"last_epoch": 8, "lr": 0.0}  # 4 real steps x 2 processes


# -- Accelerate's kwargs_handlers configure DDP --------------------------------------------------------
def _kwargs_handlers_worker() -> dict:
    from datetime import timedelta

    from ember import DistributedDataParallelKwargs, InitProcessGroupKwargs

    class Branchy(nn.Module):  # `unused` takes no part in the loss: DDP must be told to look for it
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(8, 1), nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=True, bucket_cap_mb=1.0),
        InitProcessGroupKwargs(timeout=timedelta(seconds=90)),
    ]
    accelerator = Accelerator(kwargs_handlers=handlers)
    model = Branchy()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_data(), batch_size=4)
    )
    for x, y in loader:  # two steps: without find_unused_parameters DDP raises in the second
        optimizer.zero_grad()
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
    config = accelerator.strategy.config
    return {"strategy": type(accelerator.strategy).__name__, "find_unused": config.find_unused_parameters,
            "bucket": config.bucket_cap_mb, "timeout": config.timeout.total_seconds(),
            "ddp_flag": model.find_unused_parameters}  # fmt: skip


def test_kwargs_handlers_configure_ddp() -> None:
    ranks = run_processes(_kwargs_handlers_worker, nprocs=2)
    assert ranks[0] == ranks[1] == {
        "strategy": "DDPStrategy", "find_unused": True, "bucket": 1.0, "timeout": 90.0, "ddp_flag": True,
    }  # fmt: skip


def _accelerate_names_worker(root: str) -> dict:
    from ember import DistributedType, ProfileKwargs

    accelerator = Accelerator()
    reduced = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1)]), "sum", scale=0.5)
    accelerator.save(
        {"w": torch.ones(2) * accelerator.process_index},
        Path(root) / "w.safetensors",
        safe_serialization=True,
    )
    accelerator.wait_for_everyone()
    with accelerator.profile(ProfileKwargs(output_trace_dir=f"{root}/traces")):  # a trace per process
        torch.mm(torch.ones(4, 4), torch.ones(4, 4))
    triggered = []  # rank 1 raises the flag at steps 1 and 2: both ranks see it there, and only there
    for step in range(4):
        if accelerator.process_index == 1 and step in (1, 2):
            accelerator.set_trigger()
        if accelerator.check_trigger():
            triggered.append(step)
    return {"type": accelerator.distributed_type, "is_multi_cpu": accelerator.distributed_type == DistributedType.MULTI_CPU,
            "use_distributed": accelerator.use_distributed, "reduced": reduced.tolist(), "triggered": triggered}  # fmt: skip


def test_accelerate_names_on_two_processes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ranks = run_processes(_accelerate_names_worker, str(tmp_path), nprocs=2)
    assert (
        ranks[0]
        == ranks[1]
        == {
            "type": "MULTI_CPU",
            "is_multi_cpu": True,
            "use_distributed": True,
            "reduced": [1.5],
            "triggered": [1, 2],
        }
    )
    assert load_file(str(tmp_path / "w.safetensors"))["w"].tolist() == [0.0, 0.0]  # the main process's
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["profile_0.json", "profile_1.json"]


# -- join_uneven_inputs and trigger_sync_in_backward (🤗 Accelerate's) -----------------------------
def _local_grad(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The gradient of the sum of the losses of ``inputs`` (targets 0) on this copy of ``model``."""
    model.zero_grad()
    sum(F.mse_loss(model(x), torch.zeros(len(x), 1)) for x in inputs).backward()  # type: ignore[union-attr]
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _uneven_worker() -> dict:
    model = _model()
    accelerator = Accelerator()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(10), batch_size=2))
    x, target = torch.full((2, 8), accelerator.process_index + 1.0), torch.zeros(2, 1)

    def grads() -> list[float]:
        flat = torch.cat([p.grad.flatten() for p in model.parameters()]).tolist()
        optimizer.zero_grad()
        return flat

    with accelerator.no_sync(model):
        accelerator.backward(F.mse_loss(model(x), target))
    unsynced = grads()
    with accelerator.no_sync(model):
        loss = F.mse_loss(model(x), target)
        with accelerator.trigger_sync_in_backward(model):
            accelerator.backward(loss)
    triggered = grads()
    with accelerator.no_sync(model):  # Accelerate's example: two forwards, the second backward syncs both
        loss_a, loss_b = F.mse_loss(model(x), target), F.mse_loss(model(2 * x), target)
    accelerator.backward(loss_a)
    with accelerator.trigger_sync_in_backward(model):
        accelerator.backward(loss_b)
    pattern = grads()

    try:  # a prepared SGD is not a Joinable (a ZeroRedundancyOptimizer is)
        with accelerator.join_uneven_inputs([optimizer], even_batches=False):
            refused = ""
    except TypeError as err:
        refused = str(err)
    steps, restored = 0, loader.even_batches
    with accelerator.join_uneven_inputs([model], even_batches=False):
        inside = (loader.even_batches, len(loader))
        for x, y in loader:  # 5 batches: 3 on rank 0, 2 on rank 1
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return {"unsynced": unsynced, "triggered": triggered, "pattern": pattern, "refused": refused, "inside": inside,
            "restored": restored, "after": loader.even_batches, "steps": steps, "params": flat_params(model)}  # fmt: skip


def test_join_uneven_inputs_and_trigger_sync_in_backward_on_two_processes() -> None:
    ranks = run_processes(_uneven_worker, nprocs=2, timeout=120)
    model = _model()
    inputs = [torch.full((2, 8), rank + 1.0) for rank in range(2)]

    # Under no_sync each rank keeps its own gradient; trigger_sync_in_backward all-reduces (averages).
    for rank, x in enumerate(inputs):
        torch.testing.assert_close(torch.tensor(ranks[rank]["unsynced"]), _local_grad(model, x))
    assert ranks[0]["unsynced"] != ranks[1]["unsynced"]
    mean = sum(_local_grad(model, x) for x in inputs) / 2
    assert ranks[0]["triggered"] == ranks[1]["triggered"]
    torch.testing.assert_close(torch.tensor(ranks[0]["triggered"]), mean)
    both = sum(_local_grad(model, x, 2 * x) for x in inputs) / 2
    assert ranks[0]["pattern"] == ranks[1]["pattern"]
    torch.testing.assert_close(torch.tensor(ranks[0]["pattern"]), both)

    # even_batches=False inside the block only; rank 1 joins after 2 steps and shadows rank 0's third.
    assert "not SGD" in ranks[0]["refused"] and ranks[0]["restored"] is True
    assert [r["inside"] for r in ranks] == [[False, 3], [False, 2]]
    assert [r["after"] for r in ranks] == [True, True] and [r["steps"] for r in ranks] == [3, 2]
    assert ranks[0]["params"] == ranks[1]["params"]  # the last process to finish broadcast its model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(10).tensors
    for rows, scale in ((slice(0, 4), 1.0), (slice(4, 8), 1.0), (slice(8, 10), 0.5)):
        optimizer.zero_grad()
        (
            F.mse_loss(model(x[rows]), y[rows]) * scale
        ).backward()  # the third: rank 0's gradient, averaged with 0
        optimizer.step()
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(flat_params(model)))
