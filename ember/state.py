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
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from ember._handlers import handler
from ember._processes import DistributedType, ProcessMixin
from ember._validation import PROCESS_GROUP_BACKENDS, check_bool, check_choice, check_int, check_timeout
from ember._wrappers import GradientState as _Bookkeeping
from ember.plugins import TorchDynamoPlugin

if TYPE_CHECKING:
    from torch import nn

    from ember import kwargs_handlers as kw
    from ember._checkpoint import PreparedObjects
    from ember._plugin_args import PluginChoice
    from ember.accelerator import Accelerator
    from ember.data import PreparedDataLoader
    from ember.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from ember.strategies import Strategy

__all__ = ["AcceleratorState", "GradientState", "PartialState"]

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
            f"{type(self).__name__}(distributed_type={self.distributed_type.value}, "
            f"num_processes={self.num_processes}, process_index={self.process_index}, device={self.device})"
        )


class AcceleratorState(PartialState):
    """``accelerator.state`` (🤗 Accelerate's class): where the run's processes are, as
    :class:`PartialState` tells it (``num_processes``, ``process_index``, ``local_process_index``,
    ``device``, ``distributed_type``, ``is_main_process`` ...), and the Accelerator's ``mixed_precision``.

    ``accelerator.state`` describes that Accelerator; ``AcceleratorState()`` the last one made in
    this process (made as :class:`PartialState` makes one, if there is none).

    Example::

        if accelerator.state.mixed_precision == "bf16" and accelerator.state.num_processes > 1: ...
    """

    @classmethod
    def _of(cls, accelerator: Accelerator) -> AcceleratorState:
        state = cls.__new__(cls)  # its own attributes: it describes this Accelerator, not the last one made
        state._accelerator = accelerator
        state._strategy = accelerator._strategy
        state._gradient_state = accelerator._gradient_state
        return state

    @property
    def mixed_precision(self) -> str:
        """``"fp16"``, ``"bf16"`` or ``"no"``, as :attr:`Accelerator.mixed_precision`."""
        return self._accelerator.mixed_precision

    @property
    def deepspeed_plugin(self) -> DeepSpeedPlugin | None:
        """Under DeepSpeed, the ``DeepSpeedPlugin`` given to the Accelerator, or one made from the
        strategy's configuration (a strategy chosen by name: ``ember launch --strategy deepspeed_stage_3``);
        else None, as in Accelerate."""
        if self.distributed_type != DistributedType.DEEPSPEED:
            return None
        strategy: Any = self._strategy
        given = self._accelerator._plugins.deepspeed_plugin
        from ember.plugins import DeepSpeedPlugin  # (loaded on first use)

        plugin = given if given is not None else DeepSpeedPlugin(hf_ds_config=strategy.config.user_config())
        plugin._in_use = strategy.deepspeed_config or strategy.config.user_config()  # (final after prepare)
        return plugin

    @property
    def fsdp_plugin(self) -> FullyShardedDataParallelPlugin | None:
        """Under FSDP, the ``FullyShardedDataParallelPlugin`` given to the Accelerator, or one that
        describes the strategy's configuration (sharding, offload, state dict type); else None."""
        if self.distributed_type != DistributedType.FSDP:
            return None
        given = self._accelerator._plugins.fsdp_plugin
        if given is not None:
            return given
        strategy: Any = self._strategy
        config = strategy.config  # (an FSDPConfig)
        from ember.plugins import FullyShardedDataParallelPlugin  # (loaded on first use)

        return FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=config.reshard_after_forward,
            cpu_offload=config.offload,
            state_dict_type="FULL_STATE_DICT" if config.state_dict_type == "full" else "SHARDED_STATE_DICT",
        )

    @property
    def dynamo_plugin(self) -> TorchDynamoPlugin:
        """The ``TorchDynamoPlugin`` given (or made from ``dynamo_backend``); without one, a plugin
        whose ``backend`` is ``"no"``, as in Accelerate."""
        given = self._accelerator._plugins.dynamo_plugin
        return given if given is not None else TorchDynamoPlugin(backend="no")


class GradientState:
    """``accelerator.gradient_state`` (🤗 Accelerate's class), read-only: where gradient
    accumulation and the running prepared dataloader stand.

    ``GradientState()`` describes the last Accelerator made in this process.

    Example::

        with accelerator.accumulate(model):
            ...
            if accelerator.gradient_state.sync_gradients:  # this step applies the gradients
                ...
    """

    def __init__(self) -> None:
        accelerator = _current() if _current is not None else None
        if accelerator is None:
            raise RuntimeError(
                "GradientState() describes an Accelerator's gradient accumulation, and none exists in this "
                "process: create the Accelerator first (or read accelerator.gradient_state)"
            )
        self._state = accelerator._gradient_state

    @classmethod
    def _of(cls, accelerator: Accelerator) -> GradientState:
        view = cls.__new__(cls)
        view._state = accelerator._gradient_state
        return view

    @property
    def sync_gradients(self) -> bool:
        """False on the micro-steps of ``accumulate()`` that only accumulate gradients."""
        return self._state.sync_gradients

    @property
    def num_steps(self) -> int:
        """The micro-steps per optimizer step (``gradient_accumulation_steps``)."""
        return self._state.accumulation_steps

    @property
    def end_of_dataloader(self) -> bool:
        """True while the running prepared dataloader yields its last batch."""
        return self._state.loop.end_of_dataloader

    @property
    def active_dataloader(self) -> PreparedDataLoader | None:
        """The prepared dataloader whose pass is running (the innermost), else None."""
        running = self._state.loop.running
        return running[-1] if running else None

    @property
    def in_dataloader(self) -> bool:
        return self.active_dataloader is not None

    @property
    def remainder(self) -> int:
        """Samples in the last global batch of the running pass: the dataset's length modulo the
        global batch size (0 when it divides evenly); -1 outside a pass, with ``drop_last``, or
        when the length is unknown (an iterable dataset)."""
        loader = self.active_dataloader
        if loader is None or loader.base_dataloader.drop_last or loader.total_batch_size is None:
            return -1
        try:
            length = len(loader.base_dataloader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return -1
        return length % loader.total_batch_size

    def __repr__(self) -> str:
        return (
            f"GradientState(sync_gradients={self.sync_gradients}, num_steps={self.num_steps}, "
            f"end_of_dataloader={self.end_of_dataloader}, remainder={self.remainder})"
        )


class AccelerateStateMixin:
    """🤗 Accelerate's state objects and gradient-accumulation attributes; mixed into
    :class:`~ember.Accelerator`."""

    _strategy: Strategy
    _gradient_state: _Bookkeeping
    _objects: PreparedObjects
    _owns_step: bool
    _handlers: dict[type, Any]
    _plugins: PluginChoice
    _step_scheduler_with_optimizer: bool

    @cached_property
    def state(self) -> AcceleratorState:
        """The run's processes and precision (:class:`~ember.state.AcceleratorState`)."""
        return AcceleratorState._of(self)  # type: ignore[arg-type]

    @cached_property
    def gradient_state(self) -> GradientState:
        """Gradient accumulation and the running dataloader (:class:`~ember.state.GradientState`)."""
        return GradientState._of(self)  # type: ignore[arg-type]

    @property
    def deepspeed_plugin(self) -> DeepSpeedPlugin | None:
        """``accelerator.state.deepspeed_plugin`` (🤗 Accelerate's shortcut): None unless under DeepSpeed."""
        return self.state.deepspeed_plugin

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The ``torch.amp.GradScaler`` that scales the loss under ``16-mixed``, else None (also
        under a strategy whose engine scales the loss itself: DeepSpeed)."""
        return None if self._owns_step else self._strategy.precision.scaler

    @property
    def sync_gradients(self) -> bool:
        """False on the micro-steps of :meth:`accumulate` that only accumulate gradients."""
        return self._gradient_state.sync_gradients

    @property
    def step(self) -> int:
        """The micro-steps :meth:`accumulate` counted since the last reset (the end of a prepared
        dataloader), as 🤗 Accelerate's attribute; :meth:`save_state` keeps it and :meth:`load_state`
        restores it, so a run resumed mid-accumulation steps its optimizer on the same batches."""
        return self._gradient_state.micro_step

    @step.setter
    def step(self, value: int) -> None:
        check_int("step", value, minimum=0)
        self._gradient_state.micro_step = value

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether the last ``step()`` of a prepared optimizer left the parameters unchanged: an
        accumulation micro-step, or a ``16-mixed`` step skipped for inf/NaN gradients (🤗 Accelerate's
        name; Accelerate's keeps the last real step's value on micro-steps)."""
        return any(optimizer.step_was_skipped for optimizer in self._objects.optimizers)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._gradient_state.accumulation_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int) -> None:
        """Change the micro-steps per optimizer step, between two optimizer steps (as in 🤗 Accelerate)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"gradient_accumulation_steps={steps!r} must be an int >= 1")
        if self._owns_step and steps != self._gradient_state.accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps={steps}: the {self._strategy.strategy_name!r} engine was configured "
                f"with {self._gradient_state.accumulation_steps} and cannot change it"
            )
        self._gradient_state.accumulation_steps = steps

    @property
    def end_of_dataloader(self) -> bool:
        return self._gradient_state.loop.end_of_dataloader

    # -- the settings given, read back (Accelerate's attributes) ---------------------------------------
    @property
    def ddp_handler(self) -> kw.DistributedDataParallelKwargs | None:
        return handler(self._handlers, "DistributedDataParallelKwargs")

    @property
    def scaler_handler(self) -> kw.GradScalerKwargs | None:
        return handler(self._handlers, "GradScalerKwargs")

    @property
    def init_handler(self) -> kw.InitProcessGroupKwargs | None:
        return handler(self._handlers, "InitProcessGroupKwargs")

    @property
    def autocast_handler(self) -> kw.AutocastKwargs | None:
        """The ``AutocastKwargs`` among ``kwargs_handlers``: the autocast of every prepared model's forward."""
        return handler(self._handlers, "AutocastKwargs")

    @property
    def rng_types(self) -> list[str]:
        return list(self._plugins.rng_types)

    @property
    def step_scheduler_with_optimizer(self) -> bool:
        return self._step_scheduler_with_optimizer

    @property
    def native_amp(self) -> bool:
        """Whether ``torch.autocast`` runs the forward (``16-mixed``, ``bf16-mixed``; not under DeepSpeed,
        whose engine casts), as Accelerate's."""
        return not self._owns_step and self._strategy.precision.name in ("16-mixed", "bf16-mixed")

    @property
    def is_fsdp2(self) -> bool:
        """Whether the strategy is FSDP (ember's is always FSDP2, ``fully_shard``)."""
        return cast(ProcessMixin, self).distributed_type == DistributedType.FSDP

    @property
    def multi_device(self) -> bool:
        """Several processes on accelerator devices by plain data parallelism (Accelerate's: MULTI_GPU)."""
        kind = cast(ProcessMixin, self).distributed_type  # (the Accelerator's other mixin)
        return kind == DistributedType.MULTI_GPU

    @staticmethod
    def verify_device_map(model: nn.Module) -> bool:
        """Whether a submodule of ``model`` was dispatched over several devices by a big-model loader
        (an ``hf_device_map`` of more than one entry), as Accelerate's check."""
        return any(len(getattr(m, "hf_device_map", ())) > 1 for m in model.modules())


def _new_accelerator(cpu: bool, backend: str | None, timeout: timedelta | None) -> Accelerator:
    from ember.accelerator import Accelerator
    from ember.kwargs_handlers import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if backend or timeout else []
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)
