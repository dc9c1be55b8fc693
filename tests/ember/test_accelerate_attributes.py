"""🤗 Accelerate attributes a migrating script reads: trackers, split_batches / even_batches,
a prepared loader's total_batch_size, and safe_serialization on the save methods."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, CSVLogger, DataLoaderConfiguration


def test_trackers_split_and_even_batches_and_total_batch_size(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="csv", project_dir=tmp_path, dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False))  # fmt: skip
    assert accelerator.trackers == []  # before init_trackers
    accelerator.init_trackers("proj")
    assert [type(t) for t in accelerator.trackers] == [CSVLogger]
    assert (accelerator.split_batches, accelerator.even_batches) == (True, False)
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4))
    assert loader.total_batch_size == 4  # split: the loader's batch is the global one
    accelerator.end_training()
    assert accelerator.trackers == []
    plain = Accelerator()
    assert (plain.split_batches, plain.even_batches) == (False, True)
    assert plain.prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4)).total_batch_size == 4
    assert (
        plain.prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=None)).total_batch_size is None
    )


@pytest.mark.parametrize("method", ["save_state", "save_model"])
def test_safe_serialization_false_is_refused_before_writing(tmp_path: Path, method: str) -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    args = (tmp_path / "out",) if method == "save_state" else (model, tmp_path / "out")
    with pytest.raises(
        ValueError, match=rf"{method}\(safe_serialization=False\): ember writes weights only as safetensors"
    ):
        getattr(accelerator, method)(*args, safe_serialization=False)
    assert not (tmp_path / "out").exists()
    getattr(accelerator, method)(*args, safe_serialization=True)  # Accelerate's default, accepted
    assert (tmp_path / "out").is_dir()


def test_settings_read_back_with_accelerates_names_and_values() -> None:
    import accelerate

    from ember import DistributedDataParallelKwargs, GradScalerKwargs, InitProcessGroupKwargs

    ddp, scaler, init = DistributedDataParallelKwargs(), GradScalerKwargs(), InitProcessGroupKwargs()
    ours = Accelerator(
        kwargs_handlers=[ddp, scaler, init], precision="16-mixed", rng_types=["torch"], step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(non_blocking=True, use_stateful_dataloader=False),
    )  # fmt: skip
    assert (ours.ddp_handler, ours.scaler_handler, ours.init_handler) == (ddp, scaler, init)
    assert ours.autocast_handler is None and Accelerator().ddp_handler is None
    assert ours.rng_types == ["torch"] and Accelerator().rng_types == ["generator"] and ours.native_amp
    assert ours.step_scheduler_with_optimizer is False
    assert ours.dataloader_config.non_blocking and ours.non_blocking and not ours.use_stateful_dataloader
    assert ours.use_seedable_sampler and ours.dispatch_batches is None
    theirs = accelerate.Accelerator(cpu=True)
    for name in ("native_amp", "multi_device", "is_fsdp2", "dispatch_batches", "rng_types"):
        assert getattr(Accelerator(), name) == getattr(theirs, name), name
    assert (
        Accelerator(precision="bf16-mixed").native_amp and not Accelerator(precision="bf16-true").native_amp
    )
    assert Accelerator(strategy="fsdp").is_fsdp2
    dispatched = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not Accelerator().verify_device_map(dispatched) and not theirs.verify_device_map(dispatched)
    dispatched[0].hf_device_map = {"a": 0, "b": 1}  # type: ignore[assignment]
    assert Accelerator().verify_device_map(dispatched) and theirs.verify_device_map(dispatched)


def test_on_local_process_runs_on_that_local_process_only() -> None:
    accelerator = Accelerator()
    ran = []

    @accelerator.on_local_process(local_process_index=0)
    def here() -> int:
        ran.append(0)
        return 1

    assert here() == 1 and ran == [0]
    assert accelerator.on_local_process(lambda: 2, local_process_index=1)() is None  # no local process 1
    with pytest.raises(ValueError, match=r"local_process_index=-1 must be an int >= 0"):
        accelerator.on_local_process(local_process_index=-1)
