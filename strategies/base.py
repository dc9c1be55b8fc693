"""The strategy interface and its registry.

A strategy answers: where am I (device, ranks), how do processes start, how do models and
optimizers change, how does a step run, how do ranks talk, and how is state saved. The
Accelerator calls these methods and never asks *which* strategy it holds; optional capabilities
are small interfaces (``strategies/capabilities.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn

from ember._registry import Registry
from ember._tree import move_batches
from ember.precision import Precision
from ember.strategies.environment import ProcessEnvironment
from ember.strategies.optim_state import is_named, parameter_names, to_indexed, to_named

# (its earlier home: strategies import it from here)
from ember.strategies.rebinding import setup_rebinding_optimizers as setup_rebinding_optimizers
from ember.strategies.sharded_io import TensorSpec

__all__ = [
    "STRATEGY_REGISTRY",
    "ReduceOp",
    "Strategy",
    "resolve_strategy",
]

ReduceOp = Literal["sum", "mean", "max", "min"]
REDUCE_OPS: tuple[str, ...] = ("sum", "mean", "max", "min")


def check_reduce_op(op: str, argument: str = "op") -> None:
    if op not in REDUCE_OPS:
        raise ValueError(
            f"{argument}={op!r} is not a reduction. Valid choices: {', '.join(map(repr, REDUCE_OPS))}"
        )


STRATEGY_REGISTRY: Registry[Strategy] = Registry("strategy", "strategy")


class Strategy:
    """Base class. Subclasses register their names with :meth:`register_strategies`.

    The Accelerator connects a strategy to the run with :meth:`connect`, starts any missing
    processes with :meth:`launch`, then calls :meth:`setup_environment` once.
    """

    #: Name used in checkpoints' manifests and error messages.
    strategy_name: ClassVar[str] = "base"
    #: The accelerator this strategy runs on, when it decides it (``"xla"``); None: any.
    accelerator: ClassVar[str | None] = None
    #: Whether evaluation may run under ``torch.inference_mode()`` (``Trainer(inference_mode=True)``).
    #: False where parameters are gathered and re-sharded around a forward (FSDP, DeepSpeed, XLA):
    #: training would reuse inference tensors. Those evaluate under ``torch.no_grad()``.
    evaluates_in_inference_mode: ClassVar[bool] = True
    #: Whether every process holds the whole module, unsharded, and steps it with the Trainer's
    #: torch optimizer, so that a callback may keep a full copy of the weights, average it and copy
    #: it back (``StochasticWeightAveraging``), or re-parametrise whole parameters with masks
    #: (``ModelPruning``). False for FSDP (parameters sharded) and DeepSpeed
    #: (the ZeRO engine partitions the state and owns the step and the LR schedule).
    supports_weight_averaging: ClassVar[bool] = True
    #: Whether :meth:`refresh_trainable` can follow a change of the parameters that require grad
    #: after the module was prepared (``BaseFinetuning`` unfreezing a backbone). False for FSDP
    #: (sharded parameter groups are fixed when it shards) and DeepSpeed (its engine's optimizer
    #: takes no new parameter group).
    supports_trainable_refresh: ClassVar[bool] = True

    def __init__(self) -> None:
        self._device_type = "cpu"
        self._num_processes = 1
        self._precision: Precision = Precision()
        self._environment = ProcessEnvironment(source="single")
        #: The GPU of each local process (``devices=[1, 3]``), set before :meth:`connect`; None: the
        #: local rank's.
        self.device_ids: tuple[int, ...] | None = None
        #: Seconds a rank may wait in one collective before the collective watchdog ends the run
        #: (None: no watchdog), set before :meth:`connect`. Only strategies of several processes
        #: (``ParallelStrategy``) arm a watchdog; the others have no collectives to time.
        self.collective_timeout: float | None = None

    @classmethod
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        """Add this class's names (and presets) to ``registry``."""

    # -- wiring ---------------------------------------------------------------------------------
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        """Bind the strategy to the resolved accelerator, process count, precision and environment."""
        self._device_type = device_type
        self._num_processes = num_processes
        self._precision = precision
        self._environment = environment

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` if this strategy cannot run in ``world_size`` processes started by a
        launcher (checked by ``ember launch`` before it starts them, and by the Accelerator)."""

    def auto_num_devices(self) -> int:
        """What ``devices="auto"`` means when no launcher started the processes: one, by default."""
        return 1

    def launch(self) -> None:
        """Start the processes this run needs that do not exist yet (none, by default)."""

    def setup_environment(self) -> None:
        """Create process groups and select the device. Called once, after :meth:`launch`."""

    def teardown(self) -> None:
        """Release what :meth:`setup_environment` created."""

    # -- where am I -----------------------------------------------------------------------------
    @property
    def precision(self) -> Precision:
        return self._precision

    @property
    def root_device(self) -> torch.device:
        if self._device_type == "cuda":
            ids = self.device_ids
            return torch.device("cuda", ids[self.local_rank] if ids is not None else self.local_rank)
        return torch.device(self._device_type)

    @property
    def world_size(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def is_local_zero(self) -> bool:
        return self.local_rank == 0

    # -- how objects change ---------------------------------------------------------------------
    def setup_module_and_optimizers(
        self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        """Prepare models and optimizers together (sharding strategies must re-bind optimizers)."""
        return [self.setup_module(m) for m in modules], [self.setup_optimizer(o) for o in optimizers]

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = self.precision.convert_module(module)
        return module.to(self.root_device)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        """The user's module inside whatever :meth:`setup_module` wrapped around it."""
        return module

    def refresh_trainable(self, module: nn.Module) -> nn.Module:
        """The prepared ``module`` to use from now on, after the set of its parameters that require
        grad changed (called once, at the change, never per step). Here the same module: nothing
        was wrapped around it. DDP wraps the same module anew, so that the new set is synchronised;
        strategies without :attr:`supports_trainable_refresh` raise ``RuntimeError``."""
        if not self.supports_trainable_refresh:
            raise RuntimeError(
                f"the {self.strategy_name!r} strategy cannot change which parameters require grad after "
                "prepare() (Strategy.supports_trainable_refresh): freeze them before, and keep them so"
            )
        return module

    def batches_to_device(self, batches: Iterable[Any]) -> Iterable[Any]:
        """The batches of a prepared dataloader's pass, on the device (tensors moved one batch at a
        time here; XLA strategies transfer ahead of use and shard)."""
        return move_batches(batches, self.root_device)

    # -- how a step runs ------------------------------------------------------------------------
    @property
    def direct_backward(self) -> bool:
        """True when :meth:`backward` is exactly ``loss.backward()``: neither this strategy nor its
        precision plugin adds anything, so the Accelerator calls it directly (asked once)."""
        plugin = type(self.precision)
        return (
            type(self).backward is Strategy.backward
            and plugin.pre_backward is Precision.pre_backward
            and plugin.backward is Precision.backward
            and plugin.post_backward is Precision.post_backward
        )

    @property
    def direct_optimizer_step(self) -> bool:
        """True when :meth:`optimizer_step` is exactly ``optimizer.step()`` (see :attr:`direct_backward`)."""
        return (
            type(self).optimizer_step is Strategy.optimizer_step
            and type(self.precision).optimizer_step is Precision.optimizer_step
        )

    def release(self) -> None:
        """``Accelerator.free_memory``: drop what ``prepare`` built that the strategy holds itself (an
        engine), so that a new ``prepare`` starts afresh (find_executable_batch_size's retries)."""

    def prepare_for_manual_backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        """Called before each backward a module runs itself (manual optimization: several a step, of
        losses from one forward). A wrapper that expects one backward per forward (DDP) is readied here."""

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        precision = self.precision
        loss = precision.pre_backward(loss)
        precision.backward(loss, *args, **kwargs)
        precision.post_backward(loss)

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        return self.precision.optimizer_step(optimizer, closure)

    def clip_gradients_norm(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        max_norm: float,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        for optimizer in optimizers:
            self.precision.unscale_gradients(optimizer)
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def clip_gradients_value(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        clip_value: float,
    ) -> None:
        for optimizer in optimizers:
            self.precision.unscale_gradients(optimizer)
        # With no gradient at all (a step whose training_step returned None), torch's foreach
        # implementation raises instead of clipping nothing, as clip_grad_norm_ does.
        with_grads = [p for p in parameters if p.grad is not None]
        if with_grads:
            torch.nn.utils.clip_grad_value_(with_grads, clip_value)

    # -- how ranks talk (single process: identities) --------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` across the processes (``group``: a ``torch.distributed`` process group
        of some of them; None: all)."""
        return tensor

    def reduce(self, tensor: Any, group: Any = None, reduce_op: str | None = "mean") -> Any:
        """Lightning's ``strategy.reduce``: a tensor all-reduced with ``reduce_op`` (``"mean"``, also
        spelled ``"avg"`` or None, the default; ``"sum"``, ``"max"``, ``"min"``); anything else as it is."""
        if not isinstance(tensor, torch.Tensor):
            return tensor
        op = "mean" if reduce_op in (None, "avg") else reduce_op
        check_reduce_op(op, "reduce_op")
        return self.all_reduce(tensor, cast(ReduceOp, op), group)

    def start_all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> Callable[[], torch.Tensor]:
        """Start an all-reduce without waiting for it: the returned function waits and gives the
        result. Every rank must start and wait the same all-reduces in the same order. Here (and
        where a strategy has no asynchronous collectives) it runs at once."""
        result = self.all_reduce(tensor, op)
        return lambda: result

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack ``tensor`` from every rank: shape ``(world_size, *tensor.shape)``."""
        return tensor.unsqueeze(0)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self, name: str | None = None) -> None:
        return None

    def all_arrive(self, point: str, timeout: float) -> bool:
        """Whether every process reaches ``point`` (a name that says where, the same on each) within
        ``timeout`` seconds, told to all of them alike, without a collective: a process that raised
        alone asks while the others wait in a collective of the step, which this must not join.
        ``OnExceptionCheckpoint`` saves (a collective) only when it is True. Here: one process."""
        return self.world_size == 1

    # -- how state is saved ---------------------------------------------------------------------
    @property
    def sharded_checkpoints(self) -> bool:
        """Whether ``save_state`` writes each rank's own shards instead of full tensors."""
        return False

    def module_state_dict(self, module: nn.Module, *, full: bool = True) -> dict[str, torch.Tensor]:
        """The prepared module's state dict, keyed by the names in the user's module.

        ``full=True``: unsharded tensors, valid on global rank 0 (a collective for sharded
        strategies). ``full=False``: each rank's own part (DTensors where the strategy shards).
        """
        return self.unwrap_module(module).state_dict()

    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
    ) -> None:
        """Load full tensors (or, for a sharded strategy, this rank's DTensor shards)."""
        self.unwrap_module(module).load_state_dict(state, strict=strict)

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None, *, full: bool = True
    ) -> dict[str, Any]:
        """The optimizer's state keyed by the names of its parameters in ``module`` (the prepared
        model holding them), so it loads under any strategy; by position when ``module`` is None."""
        state = optimizer.state_dict()
        names = parameter_names(self.unwrap_module(module), optimizer) if module is not None else None
        return to_named(state, names) if names is not None else state

    def full_tensors(self, module: nn.Module) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
        """Name, dtype and full shape of each state tensor, then the full tensors one at a time.

        Every rank must consume the iterator: a sharded tensor is gathered (a collective) just
        before it is yielded, so writing them costs one full tensor of memory at a time.
        """
        state = self.module_state_dict(module, full=False)
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]

        def full() -> Iterator[tuple[str, torch.Tensor]]:
            # DTensors exist only where torch.distributed.tensor was imported (by FSDP): don't
            # import it here just for the check (~0.6 s).
            dtensor = sys.modules.get("torch.distributed.tensor")
            for name, tensor in state.items():
                if dtensor is not None and isinstance(tensor, dtensor.DTensor):
                    tensor = tensor.full_tensor()
                yield name, tensor

        return specs, full()

    def configure_training(self, *, gradient_clip_val: float | None, gradient_clip_algorithm: str) -> None:
        """Settings the Trainer fixes up front, for strategies whose engine needs them before
        ``prepare`` (DeepSpeed clips inside its step). Nothing to do by default."""

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None, state: dict[str, Any]
    ) -> None:
        """Load what :meth:`optimizer_state_dict` returned (under this or another strategy)."""
        if is_named(state):
            names = parameter_names(self.unwrap_module(module), optimizer) if module is not None else None
            if names is None:
                raise ValueError(
                    "the optimizer state was saved by parameter name, but this optimizer's parameters are "
                    "not all in one prepared model; prepare the model and its optimizer together"
                )
            state = to_indexed(state, names)
        optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, device={self.root_device})"


def resolve_strategy(value: str | Strategy, *, world_size: int, device_type: str | None = None) -> Strategy:
    """Turn ``strategy=`` into an instance. ``"auto"`` is ``"xla"`` on ``accelerator="xla"``, ``"ddp"``
    for several processes, else single device."""
    if isinstance(value, Strategy):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"strategy={value!r} must be a name or an ember.strategies.Strategy instance. Valid choices: "
            + ", ".join(repr(n) for n in ["auto", *STRATEGY_REGISTRY.names()])
        )
    if value == "auto":
        value = "xla" if device_type == "xla" else "ddp" if world_size > 1 else "single_device"
    if value not in STRATEGY_REGISTRY:
        raise ValueError(
            f"strategy={value!r} is not a known strategy. {STRATEGY_REGISTRY.refusal(value)}Valid choices: "
            + ", ".join(repr(n) for n in ["auto", *STRATEGY_REGISTRY.names()])
        )
    return STRATEGY_REGISTRY.create(value)
