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
