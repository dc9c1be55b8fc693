"""``PartialState``: the processes of a run without an Accelerator (🤗 Accelerate's class).

A script that only needs to know where it runs (distributed inference, data preparation) creates a
``PartialState()``: under a launcher (``ember launch``, torchrun) it joins the process group as an
Accelerator would, and it offers the Accelerator's process helpers. Every ``PartialState`` of a
process shares one state, as in Accelerate, and a ``PartialState`` made after an Accelerator shares
that Accelerator's (an Accelerator made after a ``PartialState`` joins the same process group).

Example::

    state = PartialState()
    with state.split_between_processes(prompts) as mine:
        outputs = [generate(p) for p in mine]
    outputs = state.gather_object(outputs)  # every process's, in process order
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from ember._processes import ProcessMixin
from ember._validation import PROCESS_GROUP_BACKENDS, check_bool, check_choice, check_timeout

if TYPE_CHECKING:
    from ember.accelerator import Accelerator

__all__ = ["PartialState"]

# The Accelerator whose processes a PartialState describes: the last one made in this process.
_current: weakref.ref[Accelerator] | None = None


def set_current(accelerator: Accelerator) -> None:
    """Called by every Accelerator: a ``PartialState`` made after it describes its processes."""
    global _current
    _current = weakref.ref(accelerator)


def forget(accelerator: Accelerator) -> None:
    """Called by ``end_training``: the Accelerator's processes no longer serve a new ``PartialState``."""
    global _current
    if _current is not None and _current() is accelerator:
        _current = None
        PartialState._shared.clear()


class PartialState(ProcessMixin):
    """The processes of this run: ``num_processes``, ``process_index``, ``device``, ... and the
    Accelerator's helpers that need no model (``wait_for_everyone``, ``main_process_first``,
    ``split_between_processes``, ``gather_object``, ``print``, ``on_main_process``, ...).

    ``cpu=True`` keeps the processes on the CPU. ``backend`` and ``timeout`` set the process group's
    backend (None: NCCL on CUDA, gloo on the CPU) and timeout when this state creates it (they are
    refused once a group exists with other settings, which cannot change). As in Accelerate, every
    instance shares one state: the first one made sets it up.
    """

    _shared: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, cpu: bool = False, *, backend: str | None = None, timeout: timedelta | None = None
    ) -> None:
        self.__dict__ = self._shared  # every instance reads and writes the same attributes
        check_bool("cpu", cpu, owner="PartialState")
        check_choice("backend", backend, (None, *PROCESS_GROUP_BACKENDS), owner="PartialState")
        if timeout is not None:
            check_timeout("timeout", timeout, owner="PartialState")
        accelerator = _current() if _current is not None else None
        if accelerator is None:
            accelerator = _new_accelerator(cpu, backend, timeout)
        elif cpu or backend is not None or timeout is not None:
            raise ValueError(
                f"PartialState(cpu={cpu!r}, backend={backend!r}, timeout={timeout!r}): the processes of this run are "
                "set up already (by an Accelerator or an earlier PartialState), and these settings cannot change; "
                "pass them to the first one"
            )
        self._accelerator = accelerator
        self._strategy = accelerator._strategy
        self._gradient_state = accelerator._gradient_state

    @property
    def initialized(self) -> bool:
        return True

    @property
    def backend(self) -> str | None:
        """The process group's backend (``"gloo"``, ``"nccl"``), None on one process."""
        import torch.distributed as dist

        return str(dist.get_backend()) if self.use_distributed and dist.is_initialized() else None

    def destroy_process_group(self) -> None:
        """Release the process group (at the end of a script); a ``PartialState`` made after this
        sets up the processes again."""
        self._accelerator.end_training()

    def __repr__(self) -> str:
        return (
            f"PartialState(distributed_type={self.distributed_type.value}, num_processes={self.num_processes}, "
            f"process_index={self.process_index}, device={self.device})"
        )


def _new_accelerator(cpu: bool, backend: str | None, timeout: timedelta | None) -> Accelerator:
    from ember.accelerator import Accelerator
    from ember.kwargs_handlers import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if backend or timeout else []
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)
