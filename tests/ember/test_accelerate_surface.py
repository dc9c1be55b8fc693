"""🤗 Accelerate's public names, checked against ember's: every ``Accelerator`` attribute exists
(the parallelism, FP8 and LOMO ones ember has not answer as Accelerate does without them, or raise
naming ember's way), and ``accelerate.utils``'s loop helpers are importable from ``ember``."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from pathlib import Path

import accelerate
import pytest
import torch
from dist_helpers import run_processes
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import Accelerator


def test_every_public_accelerator_name_of_accelerate_exists() -> None:
    theirs = {name for name in dir(accelerate.Accelerator) if not name.startswith("_")}
    assert sorted(theirs - set(dir(Accelerator))) == []


def test_parallelism_names_answer_as_accelerate_without_a_parallelism_config() -> None:
    from accelerate.utils.dataclasses import FP8BackendType

    ours, theirs = Accelerator(), accelerate.Accelerator(cpu=True)
    for name in (
        "parallelism_config",
        "torch_device_mesh",
        "is_composable_parallelism_enabled",
        "should_save_model",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.fp8_backend == theirs.fp8_backend == FP8BackendType.NO == "NO"
    assert Accelerator(strategy="fsdp").is_composable_parallelism_enabled  # ember's FSDP is FSDP2
    batch = torch.arange(6.0).reshape(2, 3)
    with (
        pytest.warns(UserWarning, match=r"maybe_context_parallel\(\): ember has no context parallelism"),
        ours.maybe_context_parallel(buffers=[batch], buffer_seq_dims=[1]),
    ):
        assert batch.shape == (2, 3)  # not sharded: the block runs as it is
    loader = ours.prepare(DataLoader(TensorDataset(batch), batch_size=1))
    assert ours.deepspeed_ulysses_dl_adapter(loader, torch.nn.Linear(3, 1)) is loader


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tensor_parallel_rank", r"tensor parallelism.*accelerator\.process_index"),
        ("context_parallel_rank", r"context parallelism.*accelerator\.process_index"),
        ("pipeline_parallel_rank", r"pipeline parallelism.*accelerator\.process_index"),
        ("data_parallel_rank", r"parallelism_config.*accelerator\.process_index"),
        ("data_parallel_shard_rank", r"parallelism_config.*accelerator\.process_index"),
    ],
)
def test_parallelism_ranks_raise_naming_the_process_index(name: str, message: str) -> None:
    accelerator = Accelerator()
    with pytest.raises(RuntimeError, match=message):  # (as Accelerate's)
        getattr(accelerator, name)


def test_lomo_backward_raises_naming_backward() -> None:
    accelerator = Accelerator()
    with pytest.raises(RuntimeError, match=r"lomo_backward\(\).*LOMO.*accelerator\.backward\(loss\)"):
        accelerator.lomo_backward(torch.tensor(1.0), 0.1)


def test_accelerate_utils_names_are_exported() -> None:
    for name in (
        "send_to_device",
        "release_memory",
        "wait_for_everyone",
        "gather_object",
        "broadcast_object_list",
    ):
        assert name in ember.__all__ and callable(getattr(ember, name)), name


def test_send_to_device_as_accelerates() -> None:
    from accelerate.utils import send_to_device as theirs

    from ember import send_to_device

    Pair = namedtuple("Pair", "a b")
    data = {
        "x": torch.ones(2, dtype=torch.float64),
        "keep": [torch.zeros(1)],
        "nested": (Pair(torch.ones(1), "text"), OrderedDict(y=torch.ones(1))),
        "n": 3,
    }
    moved = send_to_device(data, "meta", skip_keys="keep")
    expected = theirs(data, "meta", skip_keys="keep")
    assert moved["x"].device.type == expected["x"].device.type == "meta"
    assert moved["keep"][0].device.type == expected["keep"][0].device.type == "cpu"
    assert type(moved["nested"][0]) is Pair and moved["nested"][0].b == "text"
    assert (
        moved["nested"][0].a.is_meta
        and type(moved["nested"][1]) is OrderedDict
        and moved["nested"][1]["y"].is_meta
    )
    assert moved["n"] == 3
    assert send_to_device(torch.nn.Linear(1, 1), torch.device("meta")).weight.is_meta  # anything with .to()
    with pytest.raises(
        TypeError, match=r"send_to_device\(skip_keys=3\) must be a str, a list of str or None"
    ):
        send_to_device(data, "cpu", skip_keys=3)
    with pytest.raises(TypeError, match=r"send_to_device\(non_blocking='yes'\) must be True or False"):
        send_to_device(data, "cpu", non_blocking="yes")


def test_release_memory_returns_one_none_per_object() -> None:
    from ember import release_memory

    a, b = torch.ones(3), torch.ones(3)
    a, b = release_memory(a, b)
    assert (a, b) == (None, None)
    assert release_memory() == []


def test_object_helpers_on_one_process() -> None:
    from ember import broadcast_object_list, gather_object, wait_for_everyone

    Accelerator().end_training()  # none of an earlier test's Accelerators is current
    wait_for_everyone()
    assert gather_object(["a", 1]) == ["a", 1] and gather_object({"k": 1}) == [{"k": 1}]
    objects = ["path", {"lr": 0.1}]
    assert broadcast_object_list(objects) is objects and objects == ["path", {"lr": 0.1}]
    with pytest.raises(TypeError, match=r"broadcast_object_list\(object_list=\('a',\)\) must be a list"):
        broadcast_object_list(("a",))
    with pytest.raises(
        ValueError, match=r"broadcast_object_list\(from_process=1\) must be an int in \[0, 0\]"
    ):
        broadcast_object_list(objects, from_process=1)


def _worker(root: str) -> dict:
    from ember import broadcast_object_list, gather_object, wait_for_everyone

    state = ember.PartialState()
    rank = state.process_index
    objects = [f"from {rank}", {"rank": rank}]
    same = broadcast_object_list(objects, from_process=1)
    Path(root, f"{rank}.txt").write_text("here")
    wait_for_everyone()
    seen = sorted(p.name for p in Path(root).iterdir())
    return {"objects": objects, "same": same is objects, "gathered": gather_object([rank]), "seen": seen}


def test_object_helpers_on_two_processes(tmp_path: Path) -> None:
    for result in run_processes(_worker, str(tmp_path), nprocs=2):
        assert result["objects"] == ["from 1", {"rank": 1}] and result["same"]
        assert result["gathered"] == [0, 1] and result["seen"] == ["0.txt", "1.txt"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("megatron_lm_plugin", object(), r"no Megatron-LM.*strategy='fsdp'"),
        ("torch_tp_plugin", object(), r"no tensor parallelism.*strategy='fsdp'"),
        ("parallelism_config", object(), r"no composable parallelism.*strategy='ddp'.*strategy='fsdp'"),
        ("deepspeed_plugins", {"a": None}, r"one DeepSpeed engine.*deepspeed_plugin=DeepSpeedPlugin"),
        ("split_batches", True, r"dataloader_config=DataLoaderConfiguration\(split_batches=True\)"),
    ],
)
def test_accelerate_only_constructor_arguments_name_embers_way(
    name: str, value: object, message: str
) -> None:
    with pytest.raises(TypeError, match=rf"Accelerator\({name}=.*\): .*{message}"):
        Accelerator(**{name: value})


def test_split_batches_false_is_accelerates_default_and_accepted() -> None:
    assert Accelerator(split_batches=False).split_batches is False


class _Probe(torch.nn.Module):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return x


def test_prepare_model_evaluation_mode_and_prepare_optimizer_device_placement() -> None:
    accelerator = Accelerator(precision="bf16-mixed")
    seen = []
    model = accelerator.prepare_model(
        torch.nn.Sequential(torch.nn.Linear(2, 2), _Probe(seen)), evaluation_mode=True
    )
    model(torch.ones(1, 2))
    assert seen == [torch.bfloat16]  # the precision's forward (autocast), as Accelerate's
    optimizer = accelerator.prepare_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), device_placement=True
    )
    assert optimizer in accelerator._objects.optimizers
    with pytest.raises(TypeError, match=r"prepare_model\(evaluation_mode='yes'\) must be True or False"):
        accelerator.prepare_model(torch.nn.Linear(2, 2), evaluation_mode="yes")
    with pytest.raises(TypeError, match=r"prepare_optimizer\(device_placement=1\) must be True or False"):
        accelerator.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=1)


def test_evaluation_mode_leaves_the_model_unwrapped() -> None:
    accelerator = Accelerator(strategy="ddp")  # (one process: DDP wraps the model all the same)
    assert type(accelerator.prepare(torch.nn.Linear(2, 2))) is not torch.nn.Linear
    model = accelerator.prepare_model(torch.nn.Linear(2, 2), evaluation_mode=True)
    assert type(model) is torch.nn.Linear and model.weight.device == accelerator.device
    assert len(accelerator._objects.models) == 1  # not saved by save_state
    accelerator.end_training()
