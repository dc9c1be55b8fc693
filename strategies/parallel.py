"""Shared base of the strategies that run one process per device over ``torch.distributed``."""

from __future__ import annotations

import atexit
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from typing_extensions import override

from ember.precision import Precision
from ember.strategies.base import ReduceOp, Strategy, check_reduce_op
from ember.strategies.environment import ProcessEnvironment, find_free_port
from ember.strategies.launcher import SubprocessScriptLauncher

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def _destroy_process_group() -> None:
    # gloo releases finished work on its worker threads, and that needs the GIL. If the group's
    # destructor joins those threads (holding the GIL) before they are done, the process deadlocks
    # (seen on torch 2.13, in ~ProcessGroupGloo). A moment without the GIL lets them finish first.
    time.sleep(0.2)
    dist.destroy_process_group()


class ParallelStrategy(Strategy):
    """Process group set-up, rank bookkeeping and collectives; subclasses decide how modules are wrapped."""

    def __init__(
        self, *, process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30)
    ):
        super().__init__()
        self._backend = process_group_backend
        self._timeout = timeout
        self._owns_process_group = False

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        if environment.launched_externally and num_processes != environment.local_world_size:
            raise ValueError(
                f"devices={num_processes} does not match the {environment.local_world_size} processes per node "
                "the launcher started; pass devices='auto' or the launcher's --nproc-per-node"
            )
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )

    @override
    def launch(self) -> None:
        if not self._environment.launched_externally and self._num_processes > 1:
            self._environment = SubprocessScriptLauncher(self._num_processes).launch()

    @property
    def process_group_backend(self) -> str:
        return self._backend or ("nccl" if self._device_type == "cuda" else "gloo")

    @override
    def setup_environment(self) -> None:
        if self._device_type == "cuda":
            torch.cuda.set_device(self.root_device)
        if dist.is_initialized():  # the user (or an earlier Accelerator) already made the default group
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(
                    f"an existing process group has world size {dist.get_world_size()}, "
                    f"but this run expects {self.world_size}"
                )
            return
        env = self._environment
        port = env.master_port if env.master_port is not None else find_free_port()
        dist.init_process_group(
            self.process_group_backend,
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=self._timeout,
        )
        self._owns_process_group = True
        atexit.register(self._teardown_at_exit)

    @override
    def teardown(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            self.barrier("teardown")  # every rank is done communicating before the group goes away
            _destroy_process_group()
        self._owns_process_group = False

    def _teardown_at_exit(self) -> None:
        # A process that exits with a live gloo group can abort in its C++ destructors
        # ("terminate called without an active exception"): destroy it first. No barrier here: at
        # exit the ranks need not be in step (one may have failed).
        if self._owns_process_group and dist.is_initialized():
            _destroy_process_group()
        self._owns_process_group = False

    @property
    @override
    def world_size(self) -> int:
        return self._environment.world_size

    @property
    @override
    def global_rank(self) -> int:
        return self._environment.rank

    @property
    @override
    def local_rank(self) -> int:
        return self._environment.local_rank

    @property
    @override
    def node_rank(self) -> int:
        return self._environment.node_rank

    # -- collectives ----------------------------------------------------------------------------
    @override
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        check_reduce_op(op)
        result = tensor.clone()
        dist.all_reduce(result, op=_REDUCE_OPS[op])
        if op == "mean":  # gloo has no AVG: sum, then divide
            result = result / self.world_size if result.is_floating_point() else result // self.world_size
        return result

    @override
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    @override
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        result = tensor.clone().contiguous()
        dist.broadcast(result, src)
        return result

    @override
    def barrier(self, name: str | None = None) -> None:
        if dist.is_initialized():
            if self.process_group_backend == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()
