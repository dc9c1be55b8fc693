"""Distributed data parallel: one process per device, gradients all-reduced by ``DistributedDataParallel``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_bool, check_number, check_process_group
from ember.strategies import ddp_comm
from ember.strategies.base import Strategy
from ember.strategies.capabilities import (
    BackwardSyncControl,
    ForcesBackwardSync,
    JoinsUnevenInputs,
    LeavesModulePlacement,
)
from ember.strategies.ddp_comm import check_comm_options, register_comm_hook
from ember.strategies.options import config_of
from ember.strategies.parallel import ParallelStrategy

__all__ = ["DDPConfig", "DDPStrategy"]

# Lightning's DDPStrategy keywords that DDPConfig spells otherwise, and those ember takes elsewhere.
_LIGHTNING_NAMES = {
    "ddp_comm_hook": "comm_hook",
    "ddp_comm_state": "comm_state",
    "ddp_comm_wrapper": "comm_wrapper",
}
_ELSEWHERE = "ember takes it from Trainer/Accelerator(...) and the environment: leave it out"
_REFUSED = {
    "start_method": "ember does not spawn or fork the ranks: strategy='ddp' re-runs the script for them (or "
    "`ember launch`; ember.notebook_launcher in a notebook)",
    "model_averaging_period": "post-localSGD model averaging is not supported: leave it out",
    **{name: _ELSEWHERE for name in ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io",
                                     "precision_plugin", "precision")},
}  # fmt: skip


@dataclass(kw_only=True, slots=True, frozen=True)
class DDPConfig:
    """Options of :class:`DDPStrategy`; the rest of ``DistributedDataParallel``'s defaults are kept.

    ``comm_hook``: a DDP communication hook, ``"fp16"``, ``"bf16"``, ``"power_sgd"``,
    ``"batched_power_sgd"`` or a callable ``hook(state, bucket) -> Future``; ``comm_state``: the
    state passed to it (for the PowerSGD names: a ``PowerSGDState`` or a dict of its options, a new
    state per model); ``comm_wrapper``: ``"fp16"``, ``"bf16"`` or a callable that wraps the hook.
    Example::

        DDPConfig(comm_hook="power_sgd", comm_state={"matrix_approximation_rank": 2})
    """

    process_group_backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    timeout: timedelta = field(default_factory=lambda: timedelta(minutes=30))
    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    broadcast_buffers: bool = True
    comm_hook: str | Callable[..., Any] | None = None
    comm_state: Any = None
    comm_wrapper: str | Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        check_process_group(self.process_group_backend, self.timeout, owner="DDPConfig")
        for name in (
            "find_unused_parameters",
            "static_graph",
            "gradient_as_bucket_view",
            "broadcast_buffers",
        ):
            check_bool(name, getattr(self, name), owner="DDPConfig")
        check_number("bucket_cap_mb", self.bucket_cap_mb, minimum=0, above=True, owner="DDPConfig")
        check_comm_options(self.comm_hook, self.comm_state, self.comm_wrapper)


class DDPStrategy(
    ParallelStrategy, BackwardSyncControl, JoinsUnevenInputs, ForcesBackwardSync, LeavesModulePlacement
):
    """Wraps each prepared model in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Example::

        accelerator = Accelerator(strategy=DDPStrategy(DDPConfig(find_unused_parameters=True)))
    """

    strategy_name = "ddp"

    def __init__(self, config: DDPConfig | None = None, **options: Any) -> None:
        # Lightning's DDPStrategy(find_unused_parameters=True, ddp_comm_hook=...) as well
        self.config = config_of("DDPStrategy", DDPConfig, config, options, _LIGHTNING_NAMES, _REFUSED)
        super().__init__(process_group_backend=self.config.process_group_backend, timeout=self.config.timeout)

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("ddp", cls, "one process per device, DistributedDataParallel")
        for unused in (True, False):
            registry.register(
                f"ddp_find_unused_parameters_{str(unused).lower()}",
                cls,
                f"ddp with find_unused_parameters={unused}",
                config=DDPConfig(find_unused_parameters=unused),
            )
        # Lightning's names for DDP whose ranks are spawned or forked at fit(): ember starts them by
        # re-running the script, or runs a function on forked processes with notebook_launcher.
        how = (
            "ember does not spawn or fork the ranks when fit() starts. Use strategy='ddp': devices=N "
            "from a plain `python script.py` re-runs the script for the other ranks (or use `ember launch`); "
            "in a notebook call ember.notebook_launcher(function, num_processes=N) with a function that "
            "builds the Trainer or Accelerator"
        )
        for start in ("spawn", "fork", "notebook"):
            for suffix in ("", "_find_unused_parameters_true", "_find_unused_parameters_false"):
                registry.refuse(f"ddp_{start}{suffix}", how)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        return self._setup_placed(super().setup_module(module))

    @override
    def setup_module_in_place(self, module: nn.Module) -> nn.Module:
        return self._setup_placed(self.precision.convert_module(module))

    def _setup_placed(self, module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            # A module that trains nothing (a frozen teacher, a reference model, an encoder): DDP
            # refuses it, and it has no gradient to synchronize. Its parameters and buffers start as
            # rank 0's, as those of a module DDP wraps do.
            with self._collective("broadcast"), torch.no_grad():
                for tensor in itertools.chain(module.parameters(), module.buffers()):
                    dist.broadcast(tensor, 0)
            return module
        return self._wrap(module)

    @override
    def refresh_trainable(self, module: nn.Module) -> nn.Module:
        # DistributedDataParallel registers the parameters that require grad when it is built: one
        # unfrozen later would never be all-reduced (the ranks' weights drift apart), one frozen
        # later fails the next backward. A new wrapper around the same module, same settings, syncs
        # exactly the present set (its construction broadcasts rank 0's weights, equal by then).
        inner = self.unwrap_module(module)
        if not any(p.requires_grad for p in inner.parameters()):
            return inner  # nothing to synchronise (as setup_module leaves such a module)
        return self._wrap(inner)

    def _wrap(self, module: nn.Module) -> nn.Module:
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        # Passed only when off: newer torch deprecates the name, and True is the default anyway.
        extra: dict[str, Any] = {} if self.config.broadcast_buffers else {"broadcast_buffers": False}
        # (a DistributedDataParallel whose unused-parameters error says which DDPConfig option fixes it)
        wrapped = ddp_comm.DistributedDataParallel(
            module,
            device_ids=device_ids,
            find_unused_parameters=self.config.find_unused_parameters,
            static_graph=self.config.static_graph,
            bucket_cap_mb=self.config.bucket_cap_mb,
            gradient_as_bucket_view=self.config.gradient_as_bucket_view,
            **extra,
        )
        register_comm_hook(wrapped, self.config.comm_hook, self.config.comm_state, self.config.comm_wrapper)
        if self.config.broadcast_buffers and next(module.buffers(), None) is not None:
            # DDP's forward broadcasts the buffers, a collective: the watchdog times it. Without
            # buffers the forward communicates nothing, and the hooks would slow every call.
            self._watch_forward(wrapped, module)
        return wrapped

    @override
    def unwrap_module(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    @override
    def prepare_for_manual_backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        # DDP readies its reducer for one backward at the end of each forward; a manual step runs a
        # backward per optimizer (a GAN's two), so each is readied as Lightning's DDP does: the
        # buckets rebuilt, and the parameters that loss does not reach marked (find_unused_parameters).
        if not isinstance(module, DistributedDataParallel):
            return
        if not (torch.is_grad_enabled() and module.require_backward_grad_sync):  # (under no_sync)
            module.require_forward_param_sync = False
            return
        module.require_forward_param_sync = True
        reached = [loss] if module.find_unused_parameters and not module.static_graph else []
        # The manual backward runs inside DDP's forward (the training_step), so DDP's own rebuild of the
        # buckets in the next forward would come after the end of this forward has readied the reducer
        # for a backward, which torch refuses. They are rebuilt here instead, before the first manual
        # backward, in the parameters' order (a no-op once rebuilt, or without find_unused_parameters).
        module.reducer._push_all_rebuilt_params()
        module.reducer._rebuild_buckets()
        module.reducer.prepare_for_backward(reached)
        if module.static_graph and not module._static_graph_delay_allreduce_enqueued:
            # A static graph's first backward all-reduces nothing in its hooks: DDP queues the
            # all-reduce of every bucket at the end of that backward from its forward's output, which
            # a backward inside the forward never reaches. The loss's gradient hook queues it.
            delay_all_reduce = module.reducer._delay_all_reduce  # type: ignore[attr-defined]  # (untyped in torch)

            def queue_all_reduce(grad: torch.Tensor) -> torch.Tensor:
                torch.autograd.Variable._execution_engine.queue_callback(delay_all_reduce)
                return grad

            loss.register_hook(queue_all_reduce)
            module._static_graph_delay_allreduce_enqueued = True

    @override
    @contextmanager
    def no_backward_sync(self, module: nn.Module) -> Iterator[None]:
        if not _wrapped(module, "no_backward_sync"):
            yield  # a module that trains nothing (left unwrapped by setup_module): nothing to hold back
            return
        if module.static_graph and not getattr(module, "_static_graph_delay_allreduce_enqueued", True):
            # A static graph is recorded in the first synchronized backward; a backward under
            # no_sync() before it fails an internal assert in torch's reducer. So this one
            # synchronizes: the gradients then hold the average so far, equal on every rank, and the
            # window's last all-reduce averages the rest onto it (the same sum).
            yield
            return
        with module.no_sync():
            yield

    @override
    def join(self, joinables: Sequence[Any], *, enable: bool) -> AbstractContextManager[Any]:
        from torch.distributed.algorithms.join import Join, Joinable

        for joinable in joinables:
            if not isinstance(joinable, Joinable):
                raise TypeError(
                    f"join_uneven_inputs() takes models prepared by DDPStrategy (DistributedDataParallel) and other "
                    f"torch.distributed.algorithms.Joinable objects (ZeroRedundancyOptimizer), not "
                    f"{type(joinable).__name__}"
                )
        # Not throw_on_early_termination: a process that runs out of batches shadows the others'
        # all-reduces with zeros, and the model of the last one to finish is broadcast at the end.
        return Join(list(joinables), enable=enable, throw_on_early_termination=False)

    @override
    @contextmanager
    def force_backward_sync(self, module: nn.Module) -> Iterator[None]:
        if not _wrapped(module, "force_backward_sync"):
            yield  # a module that trains nothing: nothing to synchronize
            return
        backward, forward = module.require_backward_grad_sync, module.require_forward_param_sync
        module.require_backward_grad_sync = module.require_forward_param_sync = True
        # A forward under no_sync() did not arm the reducer's autograd hooks (its
        # prepare_for_backward), so the next backward would not all-reduce: arm them now. The
        # buckets then all-reduce the gradients accumulated so far with this backward's.
        module.reducer.prepare_for_backward([])
        try:
            yield
        finally:
            module.require_backward_grad_sync, module.require_forward_param_sync = backward, forward


def _wrapped(module: nn.Module, method: str) -> TypeGuard[DistributedDataParallel]:
    """Whether ``module`` is DDP's wrapper; False for a module that trains nothing (``setup_module``
    leaves it unwrapped), ``TypeError`` for one that trains but was not prepared by DDP."""
    if isinstance(module, DistributedDataParallel):
        return True
    if any(p.requires_grad for p in module.parameters()):
        raise TypeError(f"{method} needs a module prepared by DDPStrategy, got {type(module).__name__}")
    return False
