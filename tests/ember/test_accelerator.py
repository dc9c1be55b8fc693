"""The Accelerator in one process: prepare, errors, accumulation, device moves, collectives, helpers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ember import Accelerator, PreparedDataLoader
from ember._wrappers import PreparedOptimizer, PreparedScheduler
from ember.data import LoopState


def _setup(**kwargs: object) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    accelerator = Accelerator(**kwargs)  # type: ignore[arg-type]
    return accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_prepare_returns_objects_in_order() -> None:
    accelerator, model, optimizer = _setup()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    out = accelerator.prepare(loader, scheduler, model, optimizer)
    assert isinstance(out[0], PreparedDataLoader)
    assert isinstance(out[1], PreparedScheduler)
    assert out[2] is model  # single device: the module itself, on the device
    assert isinstance(out[3], PreparedOptimizer) and out[3].optimizer is optimizer
    assert accelerator.prepare(nn.Linear(1, 1)).__class__ is nn.Linear  # one object: returned alone
    assert accelerator.unwrap_model(out[2]) is model


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(
        ValueError, match=r"strategy='nope' is not a known strategy\. Valid choices: 'auto', 'ddp'"
    ):
        Accelerator(strategy="nope")
    with pytest.raises(
        ValueError, match=r"precision='fp7' is not a known precision\. Valid choices: '16-mixed'"
    ):
        Accelerator(precision="fp7")
    with pytest.raises(ValueError, match=r"devices=0 is not valid\. Valid choices: a positive int"):
        Accelerator(devices=0)
    with pytest.raises(
        ValueError, match=r"accelerator='tpu' is not supported\. Valid choices: 'auto', 'cpu', 'cuda'"
    ):
        Accelerator(accelerator="tpu")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0"):
        Accelerator(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="mixed_precision='fp4'"):
        Accelerator(mixed_precision="fp4")
    accelerator = Accelerator()
    with pytest.raises(TypeError, match="cannot prepare an object of type int"):
        accelerator.prepare(42)
    with pytest.raises(RuntimeError, match=r"backward\(\) was called before accelerator.prepare"):
        accelerator.backward(torch.ones((), requires_grad=True))
    with pytest.raises(TypeError, match="state_dict"):
        accelerator.register_for_checkpointing(object())
    with pytest.raises(ValueError, match="single_device' runs one process"):
        Accelerator(strategy="single_device", devices=2)


def test_devices_in_lightnings_forms() -> None:
    from ember._devices import check_devices, resolve_devices
    from ember.strategies import DDPStrategy

    assert check_devices("auto") == "auto"
    assert check_devices(2) == check_devices("2") == 2
    assert check_devices(-1) == check_devices("-1") == -1
    assert check_devices([0, 1]) == check_devices("0,1") == check_devices((0, 1)) == (0, 1)
    assert check_devices("1,") == check_devices([1]) == (1,)
    for bad in (0, -2, "0,0", [], [-1], [True], "one", 1.5, True, None):
        with pytest.raises(ValueError, match=r"devices=.* is not valid\. Valid choices: .*-1 \(every GPU\)"):
            check_devices(bad)
    # Indices and -1 select GPUs: on the CPU they are an error before any process starts.
    for devices in ([0, 1], "0,1", -1):
        with pytest.raises(ValueError, match=r"selects GPUs, but the accelerator is 'cpu': give the number"):
            Accelerator(devices=devices, accelerator="cpu")
    assert resolve_devices(3, "cpu", None, DDPStrategy()) == (3, None)
    # On CUDA each local process takes the GPU at its local rank in the list (no GPU needed to check
    # the mapping: a torch.device is only a name).
    strategy = DDPStrategy()
    strategy._device_type, strategy.device_ids = "cuda", (2, 5)
    assert strategy.root_device == torch.device("cuda", 2)
    strategy.device_ids = None
    assert strategy.root_device == torch.device("cuda", 0)


def test_kwargs_handlers() -> None:
    from ember import DistributedDataParallelKwargs, GradScalerKwargs, InitProcessGroupKwargs

    scaled = Accelerator(
        mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=1024.0, growth_interval=7)]
    )
    assert (
        scaled.precision.scaler.get_scale() == 1024.0 and scaled.precision.scaler.get_growth_interval() == 7
    )
    # One process: DDP's options have no DDP to configure (Accelerate ignores them too).
    assert (
        Accelerator(
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        ).strategy.strategy_name
        == "single_device"
    )
    with pytest.raises(
        ValueError,
        match=r"GradScalerKwargs configure the scaler of precision='16-mixed' .* not precision='bf16-mixed'",
    ):
        Accelerator(mixed_precision="bf16", kwargs_handlers=[GradScalerKwargs()])
    with pytest.raises(
        ValueError, match=r"InitProcessGroupKwargs configure strategy='ddp', not strategy='fsdp'"
    ):
        Accelerator(strategy="fsdp", kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=5))])
    with pytest.raises(
        TypeError,
        match=r"kwargs_handlers: dict is not supported\. Valid choices: ember.DistributedDataParallelKwargs",
    ):
        Accelerator(kwargs_handlers=[{"find_unused_parameters": True}])
    with pytest.raises(ValueError, match="one GradScalerKwargs at most"):
        Accelerator(kwargs_handlers=[GradScalerKwargs(), GradScalerKwargs()])


def test_accelerate_names(tmp_path: Path) -> None:
    from ember import DistributedType

    accelerator = Accelerator()
    assert accelerator.distributed_type == DistributedType.NO == "NO" and not accelerator.use_distributed
    assert Accelerator(strategy="fsdp").distributed_type == DistributedType.FSDP
    assert accelerator.reduce({"a": torch.tensor(4.0)}, "sum", scale=0.25)["a"].item() == 1.0
    accelerator.save({"x": torch.arange(3.0)}, tmp_path / "x.safetensors", safe_serialization=True)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "x.safetensors"))["x"].tolist() == [0.0, 1.0, 2.0]
    accelerator.save({"step": 3, "note": "any object"}, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"step": 3, "note": "any object"}
    with pytest.raises(TypeError, match=r"save\(safe_serialization=True\) writes a dict of named tensors"):
        accelerator.save([torch.ones(1)], tmp_path / "bad", safe_serialization=True)
    # unscale_gradients(optimizer): the one given, under 16-mixed
    model = torch.nn.Linear(2, 1)
    scaled = Accelerator(precision="16-mixed")
    model, optimizer = scaled.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    scaled.backward(model(torch.full((1, 2), 0.01)).float().sum())
    before = model.weight.grad.clone()
    scaled.unscale_gradients(optimizer)
    torch.testing.assert_close(model.weight.grad, before / scaled.precision.scaler.get_scale())


def test_accelerate_spelling_of_precision() -> None:
    assert Accelerator(mixed_precision="bf16").precision.name == "bf16-mixed"
    assert Accelerator(mixed_precision="no", cpu=True).precision.name == "32-true"


def test_launch_defaults_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_PRECISION", "bf16-mixed")
    monkeypatch.setenv("EMBER_STRATEGY", "single_device")
    accelerator = Accelerator()
    assert accelerator.precision.name == "bf16-mixed"
    assert type(accelerator.strategy).__name__ == "SingleDeviceStrategy"
    assert Accelerator(precision="32-true").precision.name == "32-true"  # an explicit argument wins


@dataclasses.dataclass
class _Pair:
    x: torch.Tensor
    label: str


class _NestedDataset(Dataset[dict]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {
            "a": torch.tensor([float(i)]),
            "b": [torch.tensor(i), (torch.tensor(2 * i),)],
            "name": f"s{i}",
        }


def test_batches_are_moved_to_device_with_structure_kept() -> None:
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(_NestedDataset(), batch_size=2))
    batch = next(iter(loader))
    assert set(batch) == {"a", "b", "name"} and batch["name"] == ["s0", "s1"]
    assert batch["a"].device == accelerator.device and isinstance(batch["b"][1], list)
    from ember._tree import move_to_device

    moved = move_to_device(_Pair(torch.ones(2), "keep"), torch.device("cpu"))
    assert isinstance(moved, _Pair) and moved.label == "keep"


def test_loader_keeps_user_settings_and_len() -> None:
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10)), batch_size=3, drop_last=True))
    assert len(loader) == 3 and loader.batch_size == 3
    assert [b[0].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    shuffled = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10)), batch_size=5, shuffle=True))
    first, second = ([t for b in shuffled for t in b[0].tolist()] for _ in range(2))
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_without_batching_yields_samples_as_they_are(workers: int) -> None:
    # DataLoader(batch_size=None): each sample is a batch, converted but not collated into a list.
    data = TensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5.0))
    plain = list(DataLoader(data, batch_size=None))
    prepared = list(Accelerator().prepare(DataLoader(data, batch_size=None, num_workers=workers)))
    assert len(prepared) == 5 and all(
        type(p) is type(q) and len(p) == 2 for p, q in zip(prepared, plain, strict=True)
    )
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(prepared, plain, strict=True)
    )


def test_loader_does_not_advance_global_rng() -> None:
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=True))
    before = torch.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(before, torch.get_rng_state())


class _Stream(IterableDataset[torch.Tensor]):
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(7))


class _Augmenting(Dataset):
    """Each item carries draws from torch, NumPy and ``random``, made where it is fetched."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([float(index), torch.rand(()).item(), random.random(), float(np.random.rand())])


def _two_epochs(workers: int, stop: int = 0, state: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    loader = Accelerator(seed=3).prepare(
        DataLoader(_Augmenting(), batch_size=4, shuffle=True, num_workers=workers)
    )
    if state:
        loader.load_state_dict(state)
    seen: list[torch.Tensor] = []
    while loader.epoch < 2:
        for batch in loader:
            seen.append(batch)
            if len(seen) == stop:
                return seen, loader.state_dict()
    return seen, {}


def test_worker_draws_are_a_function_of_the_batch() -> None:
    full, _ = _two_epochs(workers=2)
    head, state = _two_epochs(workers=2, stop=3)  # stopped mid-epoch: the workers are gone
    tail, _ = _two_epochs(workers=2, state=state)
    assert state == {"seed": 3, "epoch": 0, "position": 3}
    assert len(full) == 12 and all(torch.equal(a, b) for a, b in zip(full, head + tail, strict=True))
    assert len({round(float(b[0, 1]), 6) for b in full}) == 12  # every batch draws its own numbers
    one_worker, _ = _two_epochs(workers=1)  # the same draws whichever worker fetches a batch
    assert all(torch.equal(a, b) for a, b in zip(full, one_worker, strict=True))


def test_iterable_dataset_single_process() -> None:
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(_Stream(), batch_size=3))
    out = []
    for batch in loader:
        out.append(accelerator.gather_for_metrics(batch).tolist())
        last = accelerator.end_of_dataloader
    assert out == [[0, 1, 2], [3, 4, 5], [6]] and last


class _SizedStream(IterableDataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(self.n))

    def __len__(self) -> int:
        return self.n


def _rank_steps(
    dataloader: DataLoader, rank: int, even: bool
) -> tuple[int, list[tuple[list[int], bool, int | None]]]:
    """``len`` of rank ``rank`` of 2's prepared loader, and each step's (samples, end_of_dataloader, remainder)."""
    loop = LoopState()
    loader = PreparedDataLoader(
        dataloader, device=None, world_size=2, rank=rank, seed=0, even_batches=even, loop_state=loop
    )
    steps = [
        ((b[0] if isinstance(b, list) else b).tolist(), loop.end_of_dataloader, loop.remainder)
        for b in loader
    ]
    return len(loader), steps


def test_a_rank_that_stops_early_cuts_nothing_from_its_last_step() -> None:
    # 5 batches on 2 ranks without even batches: rank 1 ends at step 1, a full round that
    # gather_for_metrics must keep whole (rank 0 gathers all 4 samples of that step too).
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2)
    assert _rank_steps(loader, 0, even=False) == (
        3, [([0, 1], False, None), ([4, 5], False, None), ([8, 9], True, 2)]
    )  # fmt: skip
    assert _rank_steps(loader, 1, even=False) == (2, [([2, 3], False, None), ([6, 7], True, None)])


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "even"),
    [(4, False, True), (4, False, False), (3, True, True), (3, True, False)],
)
def test_iterable_dataset_on_two_ranks_counts_and_ends_its_steps(
    batch_size: int, drop_last: bool, even: bool
) -> None:
    # 10 samples: a short last round of batches, completed, left to rank 0, or dropped. Each rank's
    # len is the steps it runs, and its last batch is the end of the dataloader (gradient sync).
    loader = DataLoader(_SizedStream(10), batch_size=batch_size, drop_last=drop_last)
    for rank in range(2):
        length, steps = _rank_steps(loader, rank, even)
        assert length == len(steps) >= 1
        assert [end for _, end, _ in steps] == [False] * (length - 1) + [True]
    if not drop_last:
        assert _rank_steps(loader, 1, even)[1][-1] == (
            ([0, 1, 2, 3], True, 2) if even else ([4, 5, 6, 7], True, None)
        )


def test_gradient_accumulation_equals_big_batch_and_scheduler_waits() -> None:
    accelerator, model, optimizer = _setup(gradient_accumulation_steps=4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    reference = nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    model, optimizer, loader, scheduler = accelerator.prepare(
        model, optimizer, DataLoader(TensorDataset(x, y), batch_size=2), scheduler
    )
    lrs = []
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(xb), yb))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step, lr in enumerate([0.1, 0.05]):
        ref_opt.param_groups[0]["lr"] = lr
        ref_opt.zero_grad()
        F.mse_loss(reference(x[8 * step : 8 * step + 8]), y[8 * step : 8 * step + 8]).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=False):
        torch.testing.assert_close(p, q)


def test_accumulation_syncs_at_end_of_dataloader() -> None:
    accelerator, model, optimizer = _setup(gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=1)
    )
    synced = []
    for (xb,) in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(xb).sum())
            optimizer.step()
            optimizer.zero_grad()
        synced.append(accelerator.sync_gradients)
    assert synced == [False, False, False, True, False, True]


def test_clip_grad_norm_and_value() -> None:
    accelerator, model, optimizer = _setup()
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(torch.randn(3, 4) * 100).sum())
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    total = accelerator.clip_grad_norm_(model.parameters(), max_norm=1.0)
    torch.testing.assert_close(total, raw)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() <= 1.0 + 1e-5
    accelerator.clip_grad_value_(model.parameters(), 0.01)
    assert max(p.grad.abs().max().item() for p in model.parameters()) <= 0.01


def test_single_process_collectives_and_helpers() -> None:
    accelerator = Accelerator()
    t = torch.arange(3)
    assert accelerator.gather(t).tolist() == [0, 1, 2]
    assert accelerator.gather(torch.tensor(5)).tolist() == 5  # 0-dim: unchanged on one process (Accelerate's)
    # One process: other objects pass through gather and gather_for_metrics as they are (nothing to
    # send; numpy arrays, PIL images ... included); gather_object still gives a list, as JSON.
    other = {"label": "cat", "array": object()}
    assert accelerator.gather(other) == other and accelerator.gather_for_metrics(other) is other
    assert accelerator.gather_object(("a", 1)) == [["a", 1]] and accelerator.gather_object([1, 2]) == [1, 2]
    assert accelerator.reduce(t, "sum").tolist() == [0, 1, 2]
    assert accelerator.pad_across_processes({"x": t})["x"].tolist() == [0, 1, 2]
    assert accelerator.broadcast(t).tolist() == [0, 1, 2]
    with accelerator.split_between_processes([1, 2, 3]) as share:
        assert share == [1, 2, 3]
    with accelerator.main_process_first():
        pass
    with accelerator.local_main_process_first():
        pass
    assert accelerator.is_last_process and accelerator.on_last_process(lambda: 1)() == 1
    assert accelerator.on_process(process_index=0)(lambda: 2)() == 2
    with pytest.raises(ValueError, match=r"process_index=1 must be an int in \[0, 1\)"):
        accelerator.on_process(lambda: 3, process_index=1)
    calls = []
    accelerator.on_main_process(lambda: calls.append(1))()
    assert calls == [1]
    with pytest.raises(ValueError, match="reduction"):
        accelerator.reduce(t, "avg")  # type: ignore[arg-type]


def test_split_between_processes_shares() -> None:
    from ember._ops import split

    items = list(range(7))
    shares = [split(items, 3, r, False) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [split(items, 3, r, True) for r in range(3)] == [[0, 1, 2], [3, 4, 6], [5, 6, 6]]  # inputs' last
    assert split({"a": torch.arange(4)}, 2, 1, False)["a"].tolist() == [2, 3]


def test_skip_first_batches() -> None:
    accelerator = Accelerator()
    plain = DataLoader(TensorDataset(torch.arange(6)), batch_size=2)
    assert [b[0].tolist() for b in accelerator.skip_first_batches(plain, 2)] == [[4, 5]]
    prepared = accelerator.prepare(DataLoader(TensorDataset(torch.arange(6)), batch_size=2))
    assert [b[0].tolist() for b in accelerator.skip_first_batches(prepared, 1)] == [[2, 3], [4, 5]]
    assert [b[0].tolist() for b in prepared] == [[0, 1], [2, 3], [4, 5]]  # later epochs are whole
    skipped_prepared = accelerator.skip_first_batches(prepared, 1)
    assert skipped_prepared.dataset is prepared.dataset and len(skipped_prepared) == 2  # the loader's own
    skipped_prepared.set_epoch(3)
    assert prepared.state_dict()["epoch"] == 3

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(5))

    stream = DataLoader(Stream(), batch_size=2)
    skipped_stream = accelerator.skip_first_batches(stream, 1)
    assert [b.tolist() for b in skipped_stream] == [[2, 3], [4]] == [b.tolist() for b in skipped_stream]
    assert skipped_stream.dataset is stream.dataset and skipped_stream.batch_size == 2
    workers = DataLoader(
        TensorDataset(torch.arange(6)),
        num_workers=1,
        multiprocessing_context="spawn",
        persistent_workers=True,
    )
    skipped = accelerator.skip_first_batches(workers, 2)
    assert isinstance(skipped, DataLoader) and skipped.persistent_workers and skipped.timeout == 0
    assert skipped.multiprocessing_context.get_start_method() == "spawn"  # every setting kept


def test_save_model_shards_with_index(tmp_path: Path) -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
    accelerator.save_model(model, tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    accelerator.save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    loaded = {}
    for name in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / "sharded" / name)))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    accelerator.save_model(model, tmp_path / "sharded")  # re-saving unsharded removes the old shards
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        accelerator.save_model(model, tmp_path / "bad", max_shard_size="lots")


def test_save_model_handles_tied_weights(tmp_path: Path) -> None:
    accelerator = Accelerator()
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    accelerator.save_model(accelerator.prepare(model), tmp_path)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])


def test_one_cycle_scheduler_never_steps_past_its_end() -> None:
    accelerator, model, optimizer = _setup()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=2)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    scheduler.steps_per_call = 3  # as on 3 processes
    optimizer.step()
    scheduler.step()
    assert scheduler.last_epoch == 2  # stopped at total_steps instead of raising


def test_call_as_forward_routes_a_method_through_the_wrapper() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

        def step(self, x: torch.Tensor) -> torch.Tensor:
            return self(x).sum()  # calls the real forward

    accelerator = Accelerator(precision="bf16-mixed")
    net = accelerator.prepare(Net())
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = accelerator.call_as_forward(net, net.step, torch.ones(1, 2))
    assert out.dtype == torch.float32 and len(seen) == 2  # the step, then the real forward inside it
    assert net(torch.ones(1, 2)).shape == (1, 2)  # the real forward is back


def test_save_state_extra_round_trip_and_free_memory(tmp_path: Path) -> None:
    accelerator = Accelerator()
    accelerator.prepare(nn.Linear(2, 2))
    accelerator.save_state(tmp_path / "a", extra={"trainer_state": {"step": 3, "t": torch.ones(2)}})
    extra = accelerator.load_state(tmp_path / "a")
    assert extra["trainer_state"]["step"] == 3 and extra["trainer_state"]["t"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="extra state name 'model_x'"):
        accelerator.save_state(tmp_path / "b", extra={"model_x": {}})
    accelerator.free_memory()
    accelerator.prepare(nn.Linear(2, 2), nn.Linear(2, 2))
    from ember import CheckpointError

    with pytest.raises(CheckpointError, match="holds 1 models"):
        accelerator.load_state(tmp_path / "a")


def test_join_uneven_inputs_and_trigger_sync_in_backward_on_one_process() -> None:
    accelerator, model, optimizer = _setup()
    loader = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with accelerator.join_uneven_inputs([model], even_batches=False):
        assert loader.even_batches is True  # one process: nothing to join, nothing changed
        with accelerator.no_sync(model), accelerator.trigger_sync_in_backward(model):
            accelerator.backward(model(torch.ones(1, 4)).sum())
    assert model.weight.grad is not None
    with pytest.raises(
        TypeError, match=r"join_uneven_inputs\(joinables\) takes a non-empty list of prepared models"
    ):
        with accelerator.join_uneven_inputs(model):  # type: ignore[arg-type]
            pass
    with pytest.raises(
        TypeError, match=r"join_uneven_inputs\(even_batches='no'\) must be True or False or None"
    ):
        with accelerator.join_uneven_inputs([model], even_batches="no"):  # type: ignore[arg-type]
            pass


def test_prepare_data_loader_without_sharding() -> None:
    accelerator = Accelerator()
    loader = accelerator.prepare_data_loader(
        DataLoader(TensorDataset(torch.arange(4)), batch_size=2), shard=False
    )
    assert [b[0].tolist() for b in loader] == [[0, 1], [2, 3]]
    with pytest.raises(TypeError, match=r"needs a torch\.utils\.data\.DataLoader, got list"):
        accelerator.prepare_data_loader([1, 2])  # type: ignore[arg-type]


def test_boundary_calls_skip_the_wrapper_only_where_it_adds_nothing() -> None:
    model = torch.nn.Linear(2, 2)
    _, plain = Accelerator().prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step, zero_grad = plain.boundary_calls()
    assert step == plain.optimizer.step and zero_grad == plain.optimizer.zero_grad
    model = torch.nn.Linear(2, 2)
    _, scaled = Accelerator(precision="16-mixed").prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step, zero_grad = scaled.boundary_calls()  # the gradient scaler's step goes through the wrapper
    assert step == scaled.step and zero_grad == scaled._zero_grad_now  # (zeroes inside a window too)


def test_accelerate_names_mixed_precision_free_memory_and_set_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember import set_seed

    assert Accelerator().mixed_precision == "no"
    assert Accelerator(mixed_precision="bf16").mixed_precision == "bf16"
    assert Accelerator(precision="no").precision.name == "32-true"  # Accelerate's spellings of precision=
    assert Accelerator(precision="bf16-true").mixed_precision == "bf16"
    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(
        nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    )
    assert accelerator.free_memory(model, optimizer) == [None, None]
    net = nn.Linear(2, 2)
    single = Accelerator()
    prepared_net = single.prepare_model(net)
    opt = single.prepare_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    sched = single.prepare_scheduler(torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1))
    assert (
        prepared_net is net
        and type(opt).__name__ == "PreparedOptimizer"
        and sched.scheduler.optimizer is opt.optimizer
    )
    with pytest.raises(TypeError, match=r"prepare_model\(\) needs a torch.nn.modules.module.Module, got SGD"):
        single.prepare_model(opt.optimizer)  # type: ignore[arg-type]
    assert accelerator.clear == accelerator.free_memory
    assert not accelerator._objects.models and not accelerator._objects.optimizers  # forgotten
    # set_seed: device_specific adds the process's rank; deterministic switches torch to it.
    monkeypatch.setenv("RANK", "3")
    assert set_seed(10, device_specific=True) == 13
    first = torch.rand(1)
    assert set_seed(13, workers=True) == 13
    assert torch.equal(torch.rand(1), first)
    try:
        set_seed(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(TypeError, match="device_specific=1 must be True or False"):
        set_seed(1, device_specific=1)  # type: ignore[arg-type]
