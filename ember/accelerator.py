"""The Accelerator: turn a hand-written PyTorch loop into a distributed, mixed-precision one.

Example::

    accelerator = Accelerator()
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    for batch in dataloader:
        loss = loss_fn(model(batch["x"]), batch["y"])
        accelerator.backward(loss)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()

The Accelerator never asks which strategy it holds: it calls the strategy's methods and asks for
optional capabilities by interface. The Trainer drives the same object.
"""

from __future__ import annotations

import builtins
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from ember import _checkpoint, _ops
from ember._rng import seed_everything
from ember._wrappers import (
    GradientState,
    PreparedOptimizer,
    PreparedScheduler,
    patch_forward,
    unpatch_forward,
)
from ember.data import PreparedDataLoader, skip_first_batches
from ember.precision import Precision, resolve_precision
from ember.strategies import BackwardSyncControl, Strategy
from ember.strategies.base import ReduceOp, check_reduce_op, resolve_strategy
from ember.strategies.environment import detect_environment, launch_defaults

__all__ = ["Accelerator"]

F = TypeVar("F", bound=Callable[..., Any])

_ACCELERATORS = ("auto", "cpu", "cuda")
# 🤗 Accelerate's spelling of the precision argument, accepted so its users can switch by import.
_ACCELERATE_PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed", "fp8": None}


def _resolve_accelerator(accelerator: str) -> str:
    if accelerator not in _ACCELERATORS:
        raise ValueError(
            f"accelerator={accelerator!r} is not supported. Valid choices: {', '.join(map(repr, _ACCELERATORS))}"
        )
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "accelerator='cuda' was requested, but torch.cuda.is_available() is False on this machine"
        )
    return accelerator


def _resolve_devices(devices: int | str, device_type: str, launched_per_node: int | None) -> int:
    if devices == "auto":
        return launched_per_node or 1
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices={devices!r} must be a positive int or 'auto'")
    if device_type == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices={devices}, but only {torch.cuda.device_count()} CUDA devices are visible")
    return devices


class Accelerator:
    """Prepare models, optimizers, dataloaders and schedulers for the chosen strategy and precision.

    Arguments left at ``None`` take the value ``ember launch`` passed down (``--strategy``,
    ``--precision``), else ``strategy="auto"`` and ``precision="32-true"``.
    """

    def __init__(
        self,
        accelerator: str | None = None,
        strategy: str | Strategy | None = None,
        devices: int | str = "auto",
        precision: str | int | Precision | None = None,
        gradient_accumulation_steps: int = 1,
        seed: int | None = None,
        *,
        even_batches: bool = True,
        mixed_precision: str | None = None,
        cpu: bool = False,
    ) -> None:
        defaults = launch_defaults()
        if mixed_precision is not None:  # Accelerate compatibility
            if mixed_precision not in _ACCELERATE_PRECISION or _ACCELERATE_PRECISION[mixed_precision] is None:
                raise ValueError(
                    f"mixed_precision={mixed_precision!r} is not supported. Valid choices: 'no', 'fp16', 'bf16'"
                )
            if precision is not None:
                raise ValueError("pass either precision= or mixed_precision=, not both")
            precision = _ACCELERATE_PRECISION[mixed_precision]
        if (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, int)
            or gradient_accumulation_steps < 1
        ):
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be an int >= 1"
            )
        if seed is not None:
            seed_everything(seed)

        # Everything is validated before any process is started.
        environment = detect_environment()
        device_type = _resolve_accelerator(
            "cpu" if cpu else accelerator or defaults.get("accelerator", "auto")
        )
        per_node = environment.local_world_size if environment.launched_externally else None
        num_processes = _resolve_devices(devices, device_type, per_node)
        precision_plugin = resolve_precision(
            precision if precision is not None else defaults.get("precision", "32-true"),
            device_type=device_type,
        )
        world_size = environment.world_size if environment.launched_externally else num_processes
        self._strategy = resolve_strategy(
            strategy if strategy is not None else defaults.get("strategy", "auto"), world_size=world_size
        )
        self._strategy.connect(
            device_type=device_type,
            num_processes=num_processes,
            precision=precision_plugin,
            environment=environment,
        )
        self._strategy.launch()
        self._strategy.setup_environment()

        self._seed = seed
        self._even_batches = even_batches
        self._gradient_state = GradientState(accumulation_steps=gradient_accumulation_steps)
        self._objects = _checkpoint.PreparedObjects()

    # -- where am I -----------------------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def precision(self) -> Precision:
        return self._strategy.precision

    @property
    def device(self) -> torch.device:
        return self._strategy.root_device

    @property
    def process_index(self) -> int:
        return self._strategy.global_rank

    @property
    def local_process_index(self) -> int:
        return self._strategy.local_rank

    @property
    def num_processes(self) -> int:
        return self._strategy.world_size

    @property
    def is_main_process(self) -> bool:
        return self._strategy.is_global_zero

    @property
    def is_local_main_process(self) -> bool:
        return self._strategy.is_local_zero

    @property
    def sync_gradients(self) -> bool:
        """False on the micro-steps of :meth:`accumulate` that only accumulate gradients."""
        return self._gradient_state.sync_gradients

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._gradient_state.accumulation_steps

    @property
    def end_of_dataloader(self) -> bool:
        return self._gradient_state.loop.end_of_dataloader

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, *objects: Any) -> Any:
        """Prepare each object for this run and return them in the same order (one object: itself).

        Models are converted to the precision, moved to the device and wrapped by the strategy;
        optimizers, schedulers and dataloaders are wrapped as described in ``docs/``.
        """
        for obj in objects:
            if not isinstance(
                obj, (nn.Module, torch.optim.Optimizer, DataLoader, PreparedDataLoader, PreparedScheduler)
            ) and not _is_scheduler(obj):
                raise TypeError(
                    f"prepare() cannot prepare an object of type {type(obj).__name__}; it accepts torch.nn.Module, "
                    "torch.optim.Optimizer, torch.utils.data.DataLoader and LR schedulers"
                )
        result: list[Any] = list(objects)
        model_slots = [i for i, o in enumerate(objects) if isinstance(o, nn.Module)]
        optim_slots = [
            i
            for i, o in enumerate(objects)
            if isinstance(o, torch.optim.Optimizer) and not isinstance(o, PreparedOptimizer)
        ]
        models, optimizers = self._strategy.setup_module_and_optimizers(
            [objects[i] for i in model_slots], [objects[i] for i in optim_slots]
        )
        for slot, model in zip(model_slots, models, strict=True):
            patch_forward(self._strategy.unwrap_module(model), self.precision)
            self._objects.models.append(model)
            result[slot] = model
        for slot, optimizer in zip(optim_slots, optimizers, strict=True):
            prepared_optimizer = PreparedOptimizer(optimizer, self._strategy, self._gradient_state)
            self._objects.optimizers.append(prepared_optimizer)
            result[slot] = prepared_optimizer
        for slot, obj in enumerate(objects):
            if isinstance(obj, DataLoader):
                result[slot] = self._prepare_dataloader(obj)
            elif _is_scheduler(obj) and not isinstance(obj, PreparedScheduler):
                prepared_scheduler = PreparedScheduler(
                    obj, self._objects.optimizers, self._gradient_state, steps_per_call=self.num_processes
                )
                self._objects.schedulers.append(prepared_scheduler)
                result[slot] = prepared_scheduler
        return result[0] if len(result) == 1 else tuple(result)

    def _prepare_dataloader(self, dataloader: DataLoader[Any]) -> PreparedDataLoader:
        # The shuffle seed must agree on every rank: rank 0's choice wins.
        seed = self._seed if self._seed is not None else torch.initial_seed() % 2**63
        seed = int(self._strategy.broadcast(torch.tensor([seed], dtype=torch.int64), 0).item())
        loader = PreparedDataLoader(
            dataloader,
            device=self.device,
            world_size=self.num_processes,
            rank=self.process_index,
            seed=seed,
            even_batches=self._even_batches,
            loop_state=self._gradient_state.loop,
        )
        self._objects.dataloaders.append(loader)
        return loader

    # -- the step -----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` through the strategy and precision (scaled by 1/accumulation steps)."""
        if not self._objects.models:
            raise RuntimeError(
                "accelerator.backward() was called before accelerator.prepare(model, ...): prepare the model "
                "first so the strategy and precision plugin can handle its backward pass"
            )
        if self._gradient_state.accumulation_steps > 1:
            loss = loss / self._gradient_state.accumulation_steps
        self._strategy.backward(loss, **kwargs)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Skip gradient synchronization for backward passes inside the context (where supported)."""
        if isinstance(self._strategy, BackwardSyncControl):
            return self._strategy.no_backward_sync(model)
        return nullcontext()

    @contextmanager
    def accumulate(self, *models: nn.Module) -> Iterator[None]:
        """Mark one micro-step; gradients are synchronized and applied every N-th step and at epoch end."""
        state = self._gradient_state
        if state.loop.end_of_dataloader:
            state.micro_step, state.sync_gradients = 0, True
        else:
            state.micro_step += 1
            state.sync_gradients = state.micro_step % state.accumulation_steps == 0
        with ExitStack() as stack:
            if not state.sync_gradients:
                for model in models:
                    stack.enter_context(self.no_sync(model))
            yield

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision plugin's forward context (autocast for the mixed precisions)."""
        return self.precision.forward_context()

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in self._objects.optimizers] if self.sync_gradients else []

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradient norm (gradients are unscaled first under ``16-mixed``); returns the total norm."""
        return self._strategy.clip_gradients_norm(
            _params(parameters), self._inner_optimizers(), max_norm, norm_type
        )

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        self._strategy.clip_gradients_value(_params(parameters), self._inner_optimizers(), clip_value)

    # -- collectives --------------------------------------------------------------------------
    def gather(self, tensor: Any) -> Any:
        """Concatenate tensors (nested structures too) from all processes along dim 0."""
        return _ops.gather(self._strategy, tensor)

    def gather_for_metrics(self, input_data: Any) -> Any:
        """:meth:`gather`, minus the samples duplicated to even out the last batch of a prepared loader."""
        gathered = _ops.gather(self._strategy, input_data)
        remainder = self._gradient_state.loop.remainder
        return gathered if remainder is None else _ops.truncate(gathered, remainder)

    def reduce(self, tensor: Any, reduction: ReduceOp = "sum") -> Any:
        """All-reduce tensors (nested structures too) with ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``."""
        check_reduce_op(reduction, "reduction")
        return _ops.reduce(self._strategy, tensor, reduction)

    def pad_across_processes(
        self, tensor: Any, dim: int = 0, pad_index: Any = 0, pad_first: bool = False
    ) -> Any:
        return _ops.pad_across_processes(self._strategy, tensor, dim, pad_index, pad_first)

    def broadcast(self, tensor: Any, from_process: int = 0) -> Any:
        if not 0 <= from_process < self.num_processes:
            raise ValueError(f"from_process={from_process} must be in [0, {self.num_processes})")
        return _ops.broadcast(self._strategy, tensor, from_process)

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

    def on_main_process(self, function: F) -> F:
        """Decorator: the function runs on the main process only (elsewhere it returns None)."""

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs) if self.is_main_process else None

        return wrapper  # type: ignore[return-value]

    @contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """Yield this process's contiguous share of a list, tuple, dict of sequences or tensor."""
        yield _ops.split(inputs, self.num_processes, self.process_index, apply_padding)

    # -- models and state -----------------------------------------------------------------------
    def unwrap_model(self, model: nn.Module, keep_fp32_wrapper: bool = True) -> nn.Module:
        """The user's module inside the strategy wrapper (DDP ...)."""
        inner = self._strategy.unwrap_module(model)
        if not keep_fp32_wrapper:
            unpatch_forward(inner)
        return inner

    def save_model(
        self, model: nn.Module, save_directory: str | os.PathLike[str], max_shard_size: int | str = "10GB"
    ) -> None:
        """Write the model's weights as safetensors (sharded, with an index JSON, above ``max_shard_size``)."""
        _checkpoint.save_model(self._strategy, model, save_directory, max_shard_size)

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Add objects with ``state_dict()``/``load_state_dict()`` to :meth:`save_state`/:meth:`load_state`."""
        for obj in objects:
            if not (
                callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"register_for_checkpointing() needs objects with state_dict() and load_state_dict(); "
                    f"{type(obj).__name__} has not both"
                )
            self._objects.custom.append(obj)

    def save_state(self, output_dir: str | os.PathLike[str]) -> Path:
        """Save everything prepared (and registered) to ``output_dir``, pickle-free; returns the path."""
        return _checkpoint.save_state(self._strategy, self._objects, output_dir)

    def load_state(self, input_dir: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_state` wrote; training then continues exactly where it stopped."""
        _checkpoint.load_state(self._strategy, self._objects, input_dir)

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        return skip_first_batches(dataloader, num_batches)

    def end_training(self) -> None:
        """Release process groups; call once at the end of a script."""
        self._strategy.teardown()

    def __repr__(self) -> str:
        return f"Accelerator(strategy={self._strategy!r}, precision={self.precision!r})"


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))


def _params(parameters: Any) -> Sequence[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)
