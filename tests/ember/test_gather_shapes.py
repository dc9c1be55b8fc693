"""Gathering tensors whose shapes differ between processes: ``Accelerator.gather`` (rows may differ,
the other dimensions and the dtype may not) and ``TrainModule.all_gather`` (the same shape everywhere)
raise a clear error on every process instead of aborting in gloo or returning garbage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


class _Gathers(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank, accelerator = self.global_rank, self.trainer.accelerator
        cases = {
            "columns": lambda: accelerator.gather(torch.ones(2, 3 + rank)),
            "dims": lambda: accelerator.gather(torch.ones((2, 3) if rank == 0 else (2,))),
            "dtype": lambda: accelerator.gather(
                torch.ones(2, 3, dtype=torch.float32 if rank == 0 else torch.int32)
            ),
            "all_gather": lambda: self.all_gather({"x": torch.ones(2 + rank)}),
            "all_gather_group": lambda: self.all_gather(
                torch.ones(1 + rank), group=torch.distributed.group.WORLD
            ),
            "rows": lambda: accelerator.gather(torch.full((1 + rank, 3), float(rank))).tolist(),  # allowed
        }
        for name, case in cases.items():
            try:
                self.seen[name] = case()
            except ValueError as error:
                self.seen[name] = str(error)
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()  # the process group still works: DDP's backward

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _worker(root: str) -> dict[str, Any]:
    module = _Gathers()
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    trainer = Trainer(default_root_dir=root, strategy="ddp", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    return module.seen


def test_gathering_tensors_of_different_shapes_names_each_process_shape(tmp_path: Path) -> None:
    for seen in run_processes(_worker, str(tmp_path), nprocs=2):
        assert seen["columns"] == (
            "gather(): tensors must have the same dtype and the same size in every dimension but the first on "
            "every process; got process 0: [2, 3] torch.float32, process 1: [2, 4] torch.float32. Make them agree "
            "first: accelerator.pad_across_processes(tensor, dim=d) pads dimension d to its longest, tensor.to(dtype) "
            "casts"
        )
        assert "process 0: [2, 3] torch.float32, process 1: [2] torch.float32" in seen["dims"]
        assert "process 0: [2, 3] torch.float32, process 1: [2, 3] torch.int32" in seen["dtype"]
        for name in ("all_gather", "all_gather_group"):
            assert seen[name].startswith(
                "all_gather(): tensors must have the same shape and dtype on every "
            ), name
        assert "process 0: [2] torch.float32, process 1: [3] torch.float32" in seen["all_gather"]
        assert seen["rows"] == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
