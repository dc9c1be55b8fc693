"""The Accelerator's collectives and process helpers (gather, reduce, print, main_process_first ...)."""

from __future__ import annotations

import builtins
import enum
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch

from ember import _ops
from ember._tree import apply_to_tensors, other_leaf
from ember._validation import check_bool
from ember._wrappers import GradientState
from ember.strategies import Strategy
from ember.strategies.base import REDUCE_OPS, ReduceOp

F = TypeVar("F", bound=Callable[..., Any])


class DistributedType(str, enum.Enum):
    """:attr:`~ember.Accelerator.distributed_type`'s values: 🤗 Accelerate's names for a run's kind."""

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"
    FSDP = "FSDP"
    DEEPSPEED = "DEEPSPEED"
    XLA = "XLA"


class ProcessMixin:
    """Communication between the processes of a run; mixed into :class:`~ember.Accelerator`."""

    _strategy: Strategy
    _gradient_state: GradientState

    @property
    def num_processes(self) -> int:
        return self._strategy.world_size

    @property
    def local_process_index(self) -> int:
        return self._strategy.local_rank

    @property
    def device(self) -> torch.device:
        return self._strategy.root_device

    @property
    def process_index(self) -> int:
        return self._strategy.global_rank

    @property
    def is_main_process(self) -> bool:
        return self._strategy.is_global_zero

    @property
    def is_local_main_process(self) -> bool:
        return self._strategy.is_local_zero

    @property
    def is_last_process(self) -> bool:
        return self._strategy.global_rank == self._strategy.world_size - 1

    @property
    def use_distributed(self) -> bool:
        """Several processes run (🤗 Accelerate's name)."""
        return self._strategy.world_size > 1

    @property
    def distributed_type(self) -> DistributedType:
        """The kind of run in 🤗 Accelerate's terms (a ``str`` enum: it compares equal to Accelerate's
        ``DistributedType`` members of the same name)."""
        name = self._strategy.strategy_name
        if name.startswith("deepspeed"):
            return DistributedType.DEEPSPEED
        if name.startswith("fsdp"):
            return DistributedType.FSDP
        if name.startswith("xla"):
            return DistributedType.XLA
        if self._strategy.world_size == 1:
            return DistributedType.NO
        return (
            DistributedType.MULTI_GPU
            if self._strategy.root_device.type == "cuda"
            else DistributedType.MULTI_CPU
        )

    # -- collectives --------------------------------------------------------------------------
    def gather(self, tensor: Any) -> Any:
        """Concatenate tensors (nested structures too) from all processes along dim 0.

        Other objects: :meth:`gather_object` (or :meth:`gather_for_metrics`, which takes both)."""
        other = other_leaf(tensor)
        if other and self.num_processes > 1:
            raise TypeError(
                f"gather() takes tensors (and dicts, lists, tuples of them); got a {type(other[0]).__name__}. "
                "Use gather_object() for other objects, or gather_for_metrics(), which gathers either"
            )
        return _ops.gather(self._strategy, tensor)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """:meth:`gather`, minus the samples duplicated to even out the last batch of a prepared loader.

        Data that is not all tensors (decoded strings, lists of labels ...) is gathered with
        :meth:`gather_object`: a list from each process makes one list, cut to the real samples too.
        ``use_gather_object=True`` (🤗 Accelerate's) takes that path whatever the data holds; as
        objects travel as JSON, tensors are refused there on several processes (gather them without it)."""
        check_bool("use_gather_object", use_gather_object, owner="gather_for_metrics")
        remainder = self._gradient_state.loop.remainder
        if use_gather_object or other_leaf(input_data):
            if self.num_processes == 1:
                return input_data
            caller = (
                "gather_for_metrics(use_gather_object=True)" if use_gather_object else "gather_for_metrics()"
            )
            objects = _ops.gather_objects(self._strategy, input_data, caller)
            if not isinstance(input_data, list):
                return objects
            gathered = [item for each in objects for item in each]
            return gathered if remainder is None else gathered[:remainder]
        gathered = _ops.gather(self._strategy, input_data)
        return gathered if remainder is None else _ops.truncate(gathered, remainder)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in process order; lists from every process are joined into one
        (as 🤗 Accelerate's ``gather_object``). Pickle-free: objects travel as JSON (strings,
        numbers, booleans, None, lists and dicts of them), so a tuple arrives as a list."""
        objects = _ops.gather_objects(self._strategy, obj, "gather_object()")
        if isinstance(obj, list):
            return [item for each in objects for item in each]
        return objects

    def reduce(self, tensor: Any, reduction: ReduceOp | Literal["none"] = "sum", scale: float = 1.0) -> Any:
        """All-reduce tensors (nested structures too) with ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``;
        each result multiplied by ``scale`` on every device (🤗 Accelerate applies ``scale`` on XLA only).
        ``"none"`` reduces nothing: each process gets a copy of its own tensors (scaled).

        The tensors must have the same shapes and dtypes on every process, else ``ValueError`` on every
        process, naming them: one small all-gather checks the whole structure before the data is sent,
        unless every tensor is 0-dim (a loss, a flag: the per-step case, left unchecked to save the
        collective)."""
        if reduction not in (*REDUCE_OPS, "none"):
            choices = ", ".join(map(repr, (*REDUCE_OPS, "none")))
            raise ValueError(f"reduction={reduction!r} is not a reduction. Valid choices: {choices}")
        _check_tensors(tensor, "reduce()")
        if reduction == "none":  # (🤗 Accelerate documents it so; its 1.15 code sums on several processes)
            reduced = apply_to_tensors(tensor, torch.clone)
        else:
            if self.num_processes > 1 and any(t.dim() for t in _ops.tensors_of(tensor)):
                _ops.check_same_tensors(self._strategy, tensor, "reduce()")
            reduced = _ops.reduce(self._strategy, tensor, reduction)
        return reduced if scale == 1.0 else apply_to_tensors(reduced, lambda t: t * scale)

    def pad_across_processes(
        self, tensor: Any, dim: int = 0, pad_index: Any = 0, pad_first: bool = False
    ) -> Any:
        return _ops.pad_across_processes(self._strategy, tensor, dim, pad_index, pad_first)

    def broadcast(self, tensor: Any, from_process: int = 0) -> Any:
        """Every process receives ``from_process``'s tensors (nested structures too), which must have
        the same shapes and dtypes on every process (else ``ValueError`` on every process, naming them)."""
        if not 0 <= from_process < self.num_processes:
            raise ValueError(f"from_process={from_process} must be in [0, {self.num_processes})")
        _check_tensors(tensor, "broadcast()")
        if self.num_processes > 1:
            _ops.check_same_tensors(self._strategy, tensor, "broadcast()")
        return _ops.broadcast(self._strategy, tensor, from_process)

    # -- a flag any process may raise ----------------------------------------------------------------
    _trigger_raised = False

    def set_trigger(self) -> None:
        """Raise this process's flag: the next :meth:`check_trigger` is True on every process. For a
        decision one process takes that all must follow, e.g. stopping early on its own metric::

            if loss.isnan():
                accelerator.set_trigger()
            if accelerator.check_trigger():  # every process, at the same point
                break
        """
        self._trigger_raised = True

    def check_trigger(self) -> bool:
        """Whether a process raised its flag (:meth:`set_trigger`) since the last check; the check
        lowers every flag. With several processes it is a collective (a one-number all-reduce):
        every process calls it at the same point of its loop."""
        raised, self._trigger_raised = self._trigger_raised, False
        if self.num_processes == 1:
            return raised
        flag = torch.tensor(int(raised), device=self._strategy.root_device)
        return bool(_ops.reduce(self._strategy, flag, "max").item())

    # -- processes ------------------------------------------------------------------------------
    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the local main process only."""
        if self.is_local_main_process:
            builtins.print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        self._strategy.barrier("wait_for_everyone")

    @contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Run the body on the main process first (e.g. a dataset download), then on the others."""
        if not self.is_main_process:
            self.wait_for_everyone()
        yield
        if self.is_main_process:
            self.wait_for_everyone()

    @contextmanager
    def local_main_process_first(self) -> Iterator[None]:
        """Run the body on each node's main process first (e.g. a download to local disk), then on
        the node's others. Every process of the run must enter it (it waits on all of them)."""
        if not self.is_local_main_process:
            self.wait_for_everyone()
        yield
        if self.is_local_main_process:
            self.wait_for_everyone()

    def on_main_process(self, function: F) -> F:
        """Decorator: the function runs on the main process only (elsewhere it returns None)."""
        return self._only_where(function, lambda: self.is_main_process)

    def on_local_main_process(self, function: F) -> F:
        """Decorator: the function runs on each node's main process only (elsewhere it returns None)."""
        return self._only_where(function, lambda: self.is_local_main_process)

    def on_last_process(self, function: F) -> F:
        """Decorator: the function runs on the last process only (elsewhere it returns None)."""
        return self._only_where(function, lambda: self.is_last_process)

    def on_process(self, function: F | None = None, process_index: int | None = None) -> Any:
        """Decorator: the function runs on process ``process_index`` only (elsewhere it returns None);
        ``@accelerator.on_process(process_index=1)``, or ``accelerator.on_process(function, 1)``."""
        if (
            isinstance(process_index, bool)
            or not isinstance(process_index, int)
            or not (0 <= process_index < self.num_processes)
        ):
            raise ValueError(f"process_index={process_index!r} must be an int in [0, {self.num_processes})")

        def decorate(fn: F) -> F:
            return self._only_where(fn, lambda: self.process_index == process_index)

        return decorate if function is None else decorate(function)

    def on_local_process(self, function: F | None = None, local_process_index: int | None = None) -> Any:
        """Decorator: the function runs on each node's process ``local_process_index`` only
        (elsewhere it returns None); ``@accelerator.on_local_process(local_process_index=1)``."""
        if (
            isinstance(local_process_index, bool)
            or not isinstance(local_process_index, int)
            or local_process_index < 0
        ):
            raise ValueError(f"local_process_index={local_process_index!r} must be an int >= 0")

        def decorate(fn: F) -> F:
            return self._only_where(fn, lambda: self.local_process_index == local_process_index)

        return decorate if function is None else decorate(function)

    @staticmethod
    def _only_where(function: F, here: Callable[[], bool]) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs) if here() else None

        return wrapper  # type: ignore[return-value]

    @contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """Yield this process's contiguous share of a list, tuple, dict of sequences or tensor."""
        yield _ops.split(inputs, self.num_processes, self.process_index, apply_padding)

    def broadcast_object(self, obj: Any, from_process: int = 0) -> Any:
        """Send a JSON-serialisable object (a path, a decision, a dict of numbers) from one process to all.

        Pickle-free: the object travels as UTF-8 JSON in a byte tensor.
        """
        device = self._strategy.root_device
        sender = self.process_index == from_process
        payload = _ops.json_bytes(json.dumps(obj), device) if sender else None
        length = self._strategy.broadcast(
            torch.tensor([payload.numel() if payload is not None else 0], device=device), from_process
        )
        buffer = (
            payload
            if payload is not None
            else torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
        )
        return _ops.from_json_bytes(self._strategy.broadcast(buffer, from_process))


def _check_tensors(data: Any, caller: str) -> None:
    """``TypeError`` unless ``data`` holds only tensors (and None): anything else would come back
    as each process has it, not reduced or broadcast (🤗 Accelerate raises too, on one process also)."""
    other = other_leaf(data)
    if other:
        raise TypeError(
            f"{caller} takes tensors (and dicts, lists, tuples of them); got a {type(other[0]).__name__}, which "
            "would come back unchanged on each process. Make it a tensor (torch.tensor(value, "
            "device=accelerator.device)), or send other objects with broadcast_object() / gather_object()"
        )
