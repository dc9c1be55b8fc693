"""XLA devices (TPU in production, the XLA CPU device in tests) through torch_xla's PJRT runtime.

Two strategies, because torch_xla has two ways to use several devices:

- :class:`XLAStrategy` (``"xla"``): one process per device, the classic TPU path. Processes start
  like every other multi-process strategy (``ember launch``, or ``devices=N`` from plain
  ``python``); each initialises its PJRT replica the way ``torch_xla.launch`` does. Gradients are
  averaged over the replicas with one XLA all-reduce before clipping or the optimizer step.
- :class:`~ember.strategies.XLASPMDStrategy` (``"xla_spmd"``, ``"xla_fsdp"``, in
  ``strategies/xla_spmd.py``): one process drives every local device through torch_xla's SPMD
  partitioner. The batch is sharded over a 1-D ``("data",)`` mesh; with ``shard_parameters`` the
  parameters (and so the optimizer state) are sharded over it too. The compiler inserts the
  collectives.

Both cut the lazy graph (``torch_xla.sync()``) right after the optimizer step and nowhere in the
user's step, move batches ahead of use, and save CPU tensors in ember's pickle-free format.
torch_xla is imported only when one of them is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember.precision import Precision
from ember.strategies.base import ReduceOp, Strategy, check_reduce_op, setup_rebinding_optimizers
from ember.strategies.capabilities import BackwardSyncControl
from ember.strategies.environment import ProcessEnvironment
from ember.strategies.parallel import ParallelStrategy

__all__ = ["XLAStrategy"]

#: Precisions XLA runs; fp16 has no grad scaler on XLA and float64 is not a TPU type.
XLA_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def check_precision(strategy: str, precision: Precision) -> None:
    if precision.name not in XLA_PRECISIONS:
        raise ValueError(
            f"precision={precision.name!r} is not supported by strategy={strategy!r}. "
            f"Valid choices: {', '.join(map(repr, XLA_PRECISIONS))}"
        )


def import_torch_xla() -> Any:
    try:
        import torch_xla
    except ImportError as error:  # torch_xla pins its torch build: say which
        raise ImportError(
            "the XLA strategies need torch_xla, built for this torch version (torch_xla 2.9 needs torch 2.9): "
            "pip install 'ember[xla]' torch==2.9.0 torch_xla==2.9.0"
        ) from error
    return torch_xla


def xla_sync() -> None:
    import torch_xla

    torch_xla.sync()


class XLAStep(Strategy):
    """What both XLA strategies share: the device, precision checks, the step's graph cut."""

    evaluates_in_inference_mode = False

    accelerator = "xla"

    def __init__(self) -> None:
        super().__init__()
        self._device: torch.device | None = None

    @property
    @override
    def root_device(self) -> torch.device:
        if self._device is None:  # before setup_environment: the device type only
            return torch.device("xla")
        return self._device

    @override
    def setup_module_and_optimizers(
        self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        # Moving a module to an XLA device gives it new parameter objects.
        return setup_rebinding_optimizers(self, modules, optimizers)

    @override
    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        stepped = self.precision.optimizer_step(optimizer, closure)
        xla_sync()  # the graph of this step (forward, backward, update) ends here, nowhere earlier
        return stepped


class XLAStrategy(XLAStep, ParallelStrategy, BackwardSyncControl):
    """One process per XLA device; gradients averaged across the replicas by XLA collectives.

    Example::

        accelerator = Accelerator(strategy="xla")        # one device, or `ember launch --strategy xla`
        trainer = Trainer(strategy="xla", devices=8)     # eight processes on a TPU host

    Multi-replica collectives need a TPU or GPU XLA runtime: torch_xla does not run them between
    processes on the XLA CPU device (pytorch/xla#9089), so there a run uses one process.
    """

    strategy_name = "xla"

    def __init__(self) -> None:
        super().__init__()
        self._modules: list[nn.Module] = []
        self._reduced: set[int] = set()  # optimizers whose gradients are averaged since the last backward

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("xla", cls, "one process per XLA device (TPU), gradients all-reduced by XLA")

    @override
    def check_world_size(self, world_size: int) -> None:
        if world_size > 1 and pjrt_device() == "CPU":
            raise ValueError(
                f"strategy='xla' cannot run {world_size} processes on the XLA CPU device: torch_xla runs no "
                "collectives between CPU processes (pytorch/xla#9089). Use one process, a TPU/GPU XLA runtime, "
                f"or strategy='xla_spmd' with devices={world_size} (one process, {world_size} virtual devices)"
            )

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        check_precision(self.strategy_name, precision)
        self.check_world_size(environment.world_size if environment.launched_externally else num_processes)
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )

    @override
    def setup_environment(self) -> None:
        torch_xla = import_torch_xla()
        if self.world_size > 1:
            # What torch_xla.launch / xmp.spawn does in each process it starts: join the replica set.
            from torch_xla._internal import pjrt

            pjrt.initialize_multiprocess(self.local_rank, self._environment.local_world_size)
        self._device = torch_xla.device()

    @override
    def teardown(self) -> None:
        if self._device is not None:
            xla_sync()

    # -- models and the step ----------------------------------------------------------------------
    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        module = super().setup_module(module)
        if self.world_size > 1:  # every replica starts from rank 0's weights (DDP does the same)
            import torch_xla.core.xla_model as xm

            xm.broadcast_master_param(module)
        self._modules.append(module)
        return module

    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        super().backward(loss, *args, **kwargs)
        self._reduced.clear()

    @override
    @contextmanager
    def no_backward_sync(self, module: nn.Module) -> Iterator[None]:
        # Gradients are averaged lazily, once, right before they are used (clipping or the step),
        # so accumulation micro-steps never communicate and nothing needs switching off.
        yield

    def _average_gradients(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        import torch_xla.core.xla_model as xm

        for optimizer in optimizers:
            if id(optimizer) in self._reduced:
                continue
            self._reduced.add(id(optimizer))
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            if grads:  # one all-reduce for all of them (a no-op for a single replica)
                xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / self.world_size)

    @override
    def clip_gradients_norm(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        max_norm: float,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        self._average_gradients(optimizers)
        return super().clip_gradients_norm(parameters, optimizers, max_norm, norm_type)

    @override
    def clip_gradients_value(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        clip_value: float,
    ) -> None:
        self._average_gradients(optimizers)
        super().clip_gradients_value(parameters, optimizers, clip_value)

    @override
    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        if closure is not None:
            raise ValueError(
                "strategy='xla' averages gradients before the optimizer step, so it cannot run an optimizer "
                "closure (LBFGS); use one process or an optimizer without closure"
            )
        self._average_gradients([optimizer])
        return super().optimizer_step(optimizer)

    @override
    def batches_to_device(self, batches: Iterable[Any]) -> Iterator[Any]:
        from torch_xla.distributed.parallel_loader import ParallelLoader

        # Background threads transfer the next batches while this one runs. The pass starts on this
        # thread: a DataLoader forks its worker processes here, not from a transfer thread while this
        # one drives the XLA runtime.
        loader = ParallelLoader(iter(batches), [self.root_device])
        try:
            yield from loader.per_device_loader(self.root_device)
        finally:  # a pass stopped early: the threads end and drop the loader (and its workers) now
            loader.close()

    # -- collectives ------------------------------------------------------------------------------
    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.root_device)

    @override
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: Any = None) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        check_reduce_op(op)
        if group is not None:
            raise ValueError(
                f"{type(self).__name__}.all_reduce(group={group!r}): XLA reduces across every process; "
                "a torch.distributed process group (self.log's sync_dist_group) is not supported here, pass None"
            )
        kind = {"sum": xm.REDUCE_SUM, "mean": xm.REDUCE_SUM, "max": xm.REDUCE_MAX, "min": xm.REDUCE_MIN}[op]
        result: torch.Tensor = xm.all_reduce(kind, self._on_device(tensor))
        if op == "mean":
            result = result / self.world_size if result.is_floating_point() else result // self.world_size
        return result.to(tensor.device)

    @override
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        gathered: torch.Tensor = xm.all_gather(self._on_device(tensor).unsqueeze(0), dim=0)
        return gathered.to(tensor.device)

    @override
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        result = self._on_device(tensor).clone()
        xm.collective_broadcast([result], root_ordinal=src)
        return result.to(tensor.device)

    @override
    def barrier(self, name: str | None = None) -> None:
        import torch_xla.core.xla_model as xm

        if self._device is not None:
            # A rendezvous cuts the graph, and every cut advances XLA's random seed. Keep the seed,
            # so that the random stream does not depend on how many barriers (checkpoints) ran.
            seed = xm.get_rng_state()
            xm.rendezvous(name or "barrier")
            xm.set_rng_state(seed)


def runtime_started() -> bool:
    import torch_xla

    return bool(torch_xla._XLAC._xla_runtime_is_initialized())


def pjrt_device() -> str:
    """The PJRT device type torch_xla will use (it picks TPU when one is present, else CPU)."""
    import_torch_xla()  # importing it selects the default device
    import torch_xla.runtime as xr

    return str(xr.device_type() or "")
