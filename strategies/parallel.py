"""Shared base of the strategies that run one process per device over ``torch.distributed``."""

from __future__ import annotations

import atexit
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous
from typing_extensions import override

from ember._validation import DEFAULT_COLLECTIVE_TIMEOUT
from ember._watchdog import CollectiveWatchdog, bounded, default_store
from ember.precision import Precision
from ember.strategies.base import ReduceOp, Strategy, check_reduce_op
from ember.strategies.environment import ProcessEnvironment, find_free_port
from ember.strategies.launcher import SubprocessScriptLauncher

_UNWATCHED = nullcontext()  # reusable: it holds no state
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


def _check_tensor(value: Any, method: str) -> None:
    # Lightning's strategy.broadcast(obj) pickles any object; these collectives send tensors only.
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{method}() takes a torch.Tensor, got {type(value).__name__}. For other objects use "
            "Accelerator.broadcast_object() or gather_object() (JSON values), or put numbers in a tensor"
        )


class ParallelStrategy(Strategy):
    """Process group set-up, rank bookkeeping and collectives; subclasses decide how modules are wrapped.

    ``collective_timeout`` (seconds, ``None``: off; set by ``Accelerator(collective_timeout=...)``
    before :meth:`setup_environment`) arms the collective watchdog (``ember/_watchdog.py``): a rank
    that waits longer than that in one of the collectives below, in ``backward`` or in a wrapper's
    forward synchronization makes every rank print its Python stacks, and the run ends with a
    report of the ranks that did not reach the collective.
    """

    def __init__(
        self, *, process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30)
    ):
        super().__init__()
        self._backend = process_group_backend
        self._timeout = timeout
        self._owns_process_group = False
        self.collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT
        self._watchdog: CollectiveWatchdog | None = None
        self._namespace = ""  # this run's keys in the store, the same on every rank
        self._arrivals: dict[str, int] = {}  # all_arrive's points, how often each was asked

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
            self._start_watchdog()
            return
        env = self._environment
        port = env.master_port if env.master_port is not None else find_free_port()
        init_method: str | None = f"tcp://{env.master_addr}:{port}"
        store: Store | None = None
        if env.restart_count:
            # torchrun's store outlives a restarted group: the previous attempt's keys (gloo peer
            # addresses) are still in it. Each attempt uses its own prefix. (torchrun counts restarts
            # per node, so this assumes every node restarted together, as it does on one node.)
            assert init_method is not None
            base, _, _ = next(rendezvous(init_method, env.rank, env.world_size, timeout=self._timeout))
            store, init_method = PrefixStore(f"ember/restart_{env.restart_count}/", base), None
        dist.init_process_group(
            self.process_group_backend,
            init_method=init_method,
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=self._timeout,
        )
        self._owns_process_group = True
        atexit.register(self._teardown_at_exit)
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self.world_size < 2 or self._watchdog is not None:
            return
        # A name for this run's keys in the store (the watchdog's, all_arrive's), from rank 0 (secrets:
        # the seeded RNGs stay untouched).
        token = torch.tensor([secrets.randbits(62) if self.is_global_zero else 0], device=self.root_device)
        dist.broadcast(token, 0)
        self._namespace = f"{int(token.item()):x}"
        if self.collective_timeout is None:
            return
        self._watchdog = CollectiveWatchdog(
            rank=self.global_rank, world_size=self.world_size, timeout=self.collective_timeout,
            store=default_store(), namespace=self._namespace,
        )  # fmt: skip
        self._watchdog.start()
        # Stopped by teardown, else at exit: also the watchdog of a strategy that joined an existing
        # group (a second Accelerator in the script), which no teardown of the group's owner stops.
        atexit.register(self._stop_watchdog)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _collective(self, name: str) -> AbstractContextManager[None]:
        """A region the watchdog times: every rank must enter it and none may leave before all arrive."""
        watchdog = self._watchdog
        return _UNWATCHED if watchdog is None else watchdog.region(name)

    def _watch_forward(self, wrapper: nn.Module, inner: nn.Module) -> None:
        """Time the collectives ``wrapper`` runs in its forward before it calls ``inner`` (DDP
        broadcasts buffers there) as a region. It ends when ``inner`` starts: the user's forward (under
        the Trainer, the whole ``training_step``) is computation, not waiting for other ranks."""
        open_region = [False]

        def enter(*_: Any) -> None:
            if self._watchdog is not None:
                self._watchdog.enter("forward")
                open_region[0] = True

        def leave(*_: Any) -> None:
            if open_region[0] and self._watchdog is not None:
                self._watchdog.exit()
            open_region[0] = False

        wrapper.register_forward_pre_hook(enter)
        inner.register_forward_pre_hook(leave)
        wrapper.register_forward_hook(leave, always_call=True)  # if the wrapper failed before ``inner``

    @override
    def teardown(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            self.barrier("teardown")  # every rank is done communicating before the group goes away
            self._stop_watchdog()
            _destroy_process_group()
        self._stop_watchdog()
        self._owns_process_group = False

    def _teardown_at_exit(self) -> None:
        # A process that exits with a live gloo group can abort in its C++ destructors
        # ("terminate called without an active exception"): destroy it first. No barrier here: at
        # exit the ranks need not be in step (one may have failed).
        self._stop_watchdog()
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

    # -- the step and collectives: each a region the watchdog times ----------------------------
    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with self._collective("backward"):  # DDP / FSDP synchronize gradients inside backward
            super().backward(loss, *args, **kwargs)

    @override
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: Any = None) -> torch.Tensor:
        check_reduce_op(op)
        _check_tensor(tensor, "all_reduce")
        result, home = self._communicable(tensor)
        with self._collective("all_reduce"):
            dist.all_reduce(result, op=_REDUCE_OPS[op], group=group)
        if op == "mean":  # gloo has no AVG: sum, then divide (by the group's size)
            size = self.world_size if group is None else dist.get_world_size(group)
            result = result / size if result.is_floating_point() else result // size
        return result.to(home)

    def _communicable(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
        """A copy of ``tensor`` that the group's backend can send, and the device the result goes back
        to. NCCL sends no host tensor (a ``self.log(..., sync_dist=True)`` of a Python number, a
        callback's flag): such a tensor goes through this process's GPU and comes back."""
        if tensor.device.type == "cpu" and self.process_group_backend == "nccl":
            return tensor.to(self.root_device, copy=True), tensor.device
        return tensor.clone(), tensor.device

    @override
    def start_all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> Callable[[], torch.Tensor]:
        check_reduce_op(op)
        _check_tensor(tensor, "start_all_reduce")
        if op == "mean" or type(self).all_reduce is not ParallelStrategy.all_reduce:
            return super().start_all_reduce(tensor, op)  # gloo has no AVG / not torch.distributed's (XLA)
        result, home = self._communicable(tensor)
        work = dist.all_reduce(result, op=_REDUCE_OPS[op], async_op=True)

        def wait() -> torch.Tensor:
            assert work is not None
            with self._collective("all_reduce"):
                work.wait()
            return result.to(home)

        return wait

    @override
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        _check_tensor(tensor, "all_gather")
        sent, home = self._communicable(tensor.contiguous())
        parts = [torch.empty_like(sent) for _ in range(self.world_size)]
        with self._collective("all_gather"):
            dist.all_gather(parts, sent)
        return torch.stack(parts).to(home)

    @override
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        _check_tensor(tensor, "broadcast")
        result, home = self._communicable(tensor.contiguous())
        with self._collective("broadcast"):
            dist.broadcast(result, src)
        return result.to(home)

    @override
    def all_arrive(self, point: str, timeout: float) -> bool:
        """Through the process group's store, not a collective. The first process that decides (all
        arrived, or its ``timeout`` ran out) writes the answer and every process reads that one, so a
        process that arrives after another gave up does not go on alone. The wait ends before the
        watchdog of a process waiting in a collective for this one would fire (half its timeout)."""
        if self.world_size < 2:
            return True
        store = default_store()
        if store is None or not self._namespace:
            return False
        if self.collective_timeout is not None:
            timeout = min(timeout, self.collective_timeout / 2)
        # A point asked again (a second failed fit in the same group) counts anew.
        count = self._arrivals[point] = self._arrivals.get(point, 0) + 1
        key = f"ember_arrive/{self._namespace}/{point}/{count}"
        answer: list[bool] = []

        def agree() -> None:
            deadline = time.monotonic() + timeout
            arrived = store.add(f"{key}/arrived", 1)
            while arrived < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                arrived = store.add(f"{key}/arrived", 0)
            wanted = "yes" if arrived >= self.world_size else "no"
            decided = store.compare_set(f"{key}/decision", "", wanted)
            answer.append(decided in (b"yes", "yes"))

        # A store whose server is gone (the process that held it ended) fails or blocks: no.
        failure = bounded(agree, timeout + 5.0)
        return failure is None and answer == [True]

    @override
    def barrier(self, name: str | None = None) -> None:
        if dist.is_initialized():
            with self._collective(f"barrier({name})" if name else "barrier"):
                if self.process_group_backend == "nccl":
                    dist.barrier(device_ids=[self.root_device.index])
                else:
                    dist.barrier()
