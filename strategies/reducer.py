"""Capabilities of strategies whose backward all-reduces gradients as it runs, through the hooks of
a reducer (``DistributedDataParallel``'s): processes may join when their inputs run out, and a
backward inside ``no_backward_sync`` may be made to synchronize anyway.

They are small interfaces, as those of :mod:`ember.strategies.base`: the Accelerator asks for them
with ``isinstance`` (``join_uneven_inputs``, ``trigger_sync_in_backward``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

__all__ = ["ForcesBackwardSync", "JoinsUnevenInputs"]


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
