"""Capabilities: small interfaces a strategy may implement beside :class:`~ember.strategies.Strategy`.

The Accelerator and the Trainer ask for them with ``isinstance`` (asked once where it is on a hot
path) and never ask which strategy they hold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BackwardSyncControl",
    "EngineCheckpoints",
    "ForcesBackwardSync",
    "JoinsUnevenInputs",
    "LeavesModulePlacement",
    "MaterializesModules",
    "OwnsOptimizerStep",
]


class BackwardSyncControl(ABC):
    """Capability: the strategy can skip gradient synchronization (for gradient accumulation)."""

    @abstractmethod
    def no_backward_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        """Context in which backward passes through ``module`` do not synchronize gradients."""


class OwnsOptimizerStep(ABC):
    """Capability: the strategy's engine runs the optimizer step inside backward (DeepSpeed).

    The Accelerator sets ``gradient_accumulation_steps`` and ``micro_batch_size`` (from the first
    prepared dataloader) before it prepares the model, calls :meth:`backward_and_step` for every
    backward, and ``optimizer.step()`` only reports whether the engine stepped.
    """

    micro_batch_size: int | None
    gradient_accumulation_steps: int

    @abstractmethod
    def check_client_scheduler(self, scheduler: Any) -> None:
        """Called for each LR scheduler the loop steps itself: raise if the engine's own scheduler
        would contradict it."""

    @abstractmethod
    def backward_and_step(self, loss: torch.Tensor, *, boundary: bool, **kwargs: Any) -> None:
        """Backward of ``loss`` (already divided by the accumulation steps); apply the optimizer
        when ``boundary`` (the end of an accumulation window)."""

    @abstractmethod
    def compile_engine(self, engine: nn.Module, compile_kwargs: dict[str, Any]) -> None:
        """Compile the module inside ``engine`` in place with ``torch.compile``'s options (``backend``,
        ``mode``, ``fullgraph``, ...), as the engine's own ``compile`` does."""


class EngineCheckpoints(ABC):
    """Capability: models and optimizers are saved by the strategy's engine in its own format
    (``save_state`` writes them to ``<dir>/<strategy_name>/``; manifest layout = strategy name)."""

    @abstractmethod
    def save_engine_state(self, directory: Path) -> None:
        """Every rank writes its part of the prepared model and optimizer under ``directory``."""

    @abstractmethod
    def load_engine_state(self, directory: Path) -> None:
        """Every rank restores its part from what :meth:`save_engine_state` wrote."""


class LeavesModulePlacement(ABC):
    """Capability: a module can be prepared where it is, not moved to the device
    (``prepare(..., device_placement=[False])``): single device, DDP. Strategies that place
    parameters as they shard them (FSDP, DeepSpeed, XLA) do not have it."""

    @abstractmethod
    def setup_module_in_place(self, module: nn.Module) -> nn.Module:
        """``setup_module(module)`` without the move to the device: the caller placed it."""


class MaterializesModules:
    """Capability: ``setup_module`` accepts modules built on the meta device and materialises them
    (each process allocating only its own shards), so they can be created without memory."""


# -- strategies whose backward all-reduces through a reducer's hooks (DDP) --------------------------
class JoinsUnevenInputs(ABC):
    """Capability: processes with different numbers of batches can train together (DDP)."""

    @abstractmethod
    def join(self, joinables: Sequence[Any], *, enable: bool) -> AbstractContextManager[Any]:
        """Context in which a process whose inputs ran out shadows the others' collectives until
        every process is done (``torch.distributed.algorithms.Join`` over ``joinables``)."""


class ForcesBackwardSync(ABC):
    """Capability: the next backward of a module synchronizes gradients even inside
    ``no_backward_sync`` (and after forwards run there)."""

    @abstractmethod
    def force_backward_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        """Context whose first backward through ``module`` synchronizes its gradients."""
