"""Gathering tensors whose shapes differ between processes: ``Accelerator.gather`` (rows may differ,
the other dimensions and the dtype may not), ``TrainModule.all_gather`` and ``Accelerator.reduce``
(the same shape everywhere) raise a clear error on every process instead of aborting in gloo or
returning garbage; the check costs one small all-gather per call, not one per tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


@contextmanager
def _counting(calls: dict[str, int]) -> Iterator[None]:
    """Count the real ``torch.distributed`` collectives made inside the block (each still runs)."""
    dist = torch.distributed
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast")}

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return call

    for name, real in originals.items():
        setattr(dist, name, counted(name, real))
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)


def _counted(case: Callable[[], Any]) -> dict[str, Any]:
    calls: dict[str, int] = {}
    with _counting(calls):
        result = case()
    return {"calls": calls, "result": result}


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
            "all_gather_keys": lambda: self.all_gather(
                {"x": torch.ones(2), **({"y": torch.ones(2)} if rank else {})}
            ),
            "all_gather_many": lambda: _counted(
                lambda: {
                    k: v.tolist()
                    for k, v in self.all_gather(
                        {str(i): torch.full((2,), float(i + rank)) for i in range(5)}
                    ).items()
                }
            ),
            "gather_many": lambda: _counted(
                lambda: [
                    t.tolist()
                    for t in accelerator.gather([torch.full((1 + rank,), float(i)) for i in range(20)])
                ]
            ),
            "broadcast_many": lambda: _counted(
                lambda: accelerator.broadcast([torch.full((2,), float(rank))] * 3)[2].tolist()
            ),
            "reduce_many": lambda: _counted(
                lambda: accelerator.reduce({"a": torch.ones(2), "b": torch.ones(3)})["b"].tolist()
            ),
            "reduce_scalars": lambda: _counted(
                lambda: accelerator.reduce([torch.tensor(1.0), torch.tensor(2)], "max")[1].item()
            ),
            "reduce_length": lambda: accelerator.reduce(torch.ones(2 + rank)),
            "reduce_shape": lambda: accelerator.reduce(torch.ones((2, 3) if rank == 0 else (3, 2))),
            "reduce_dtype": lambda: accelerator.reduce(
                torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64)
            ),
            "reduce_none": lambda: _counted(
                lambda: accelerator.reduce({"x": torch.full((2,), float(rank))}, reduction="none")[
                    "x"
                ].tolist()
            ),
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
    for rank, seen in enumerate(run_processes(_worker, str(tmp_path), nprocs=2)):
        assert seen["columns"] == (
            "gather(): tensors must have the same dtype and the same size in every dimension but the first on "
            "every process; got process 0: [2, 3] torch.float32; process 1: [2, 4] torch.float32. Make them agree "
            "first: accelerator.pad_across_processes(tensor, dim=d) pads dimension d to its longest, tensor.to(dtype) "
            "casts"
        )
        assert "process 0: [2, 3] torch.float32; process 1: [2] torch.float32" in seen["dims"]
        assert "process 0: [2, 3] torch.float32; process 1: [2, 3] torch.int32" in seen["dtype"]
        for name in ("all_gather", "all_gather_group"):
            assert seen[name].startswith(
                "all_gather(): tensors must have the same shape and dtype on every "
            ), name
        assert "process 0: [2] torch.float32; process 1: [3] torch.float32" in seen["all_gather"]
        assert (
            "process 0: [2] torch.float32; process 1: [2] torch.float32, [2] torch.float32"
            in seen["all_gather_keys"]
        )
        assert seen["rows"] == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
        # The shapes of a whole structure travel in one small all-gather (a second one past 14
        # tensors, for their lengths), then one collective per tensor for the data.
        assert seen["all_gather_many"] == {
            "calls": {"all_gather": 1 + 5},
            "result": {str(i): [[float(i)] * 2, [float(i + 1)] * 2] for i in range(5)},
        }
        assert seen["gather_many"] == {
            "calls": {"all_gather": 2 + 20},
            "result": [[float(i)] * 3 for i in range(20)],
        }
        assert seen["broadcast_many"] == {"calls": {"all_gather": 1, "broadcast": 3}, "result": [0.0, 0.0]}
        assert seen["reduce_many"] == {"calls": {"all_gather": 1, "all_reduce": 2}, "result": [2.0] * 3}
        assert seen["reduce_scalars"] == {"calls": {"all_reduce": 2}, "result": 2}  # 0-dim: not checked
        assert seen["reduce_length"] == (
            "reduce(): tensors must have the same shape and dtype on every process; got process 0: [2] "
            "torch.float32; process 1: [3] torch.float32. Make them agree first: accelerator.pad_across_processes"
            "(tensor, dim=d) pads dimension d to its longest, tensor.to(dtype) casts"
        )
        assert "process 0: [2, 3] torch.float32; process 1: [3, 2] torch.float32" in seen["reduce_shape"]
        assert "process 0: [4] torch.float32; process 1: [4] torch.float64" in seen["reduce_dtype"]
        # 🤗 Accelerate documents reduction="none" as no operation: each process keeps its own values
        assert seen["reduce_none"] == {"calls": {}, "result": [float(rank)] * 2}
