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

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from ember import _checkpoint, _forward, _trackers, plugins
from ember import _handlers as kwargs_handlers_module  # (ember.kwargs_handlers loads when one is given)
from ember._devices import (
    check_accelerator,
    check_devices,
    check_in_place,
    device_placements,
    requested_processes,
    resolve_accelerator,
    resolve_devices,
)
from ember._parallelism import ParallelismMixin, refuse_accelerate_only
from ember._plugin_args import resolve_plugins
from ember._prepare_one import PrepareOneMixin
from ember._processes import ProcessMixin
from ember._rng import seed_everything
from ember._skip import skip_first_batches
from ember._state import StateMixin
from ember._step import StepMixin
from ember._trackers import TrackerMixin
from ember._validation import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    check_bool,
    check_collective_timeout,
    check_int,
    check_path,
)
from ember._wrappers import PreparedOptimizer, PreparedScheduler, patch_forward
from ember.data import PreparedDataLoader
from ember.dataloader_config import DataLoaderConfiguration, DataLoaderSettings, check_dataloader_config
from ember.empty_weights import check_materialized
from ember.precision import Precision, resolve_precision
from ember.project import ProjectConfiguration, check_project
from ember.state import AccelerateStateMixin, forget, set_current
from ember.strategies import Strategy
from ember.strategies.base import resolve_strategy
from ember.strategies.capabilities import LeavesModulePlacement, MaterializesModules, OwnsOptimizerStep
from ember.strategies.environment import detect_environment, launch_defaults

if TYPE_CHECKING:
    from ember._trackers import LogWith

__all__ = ["Accelerator"]

F = TypeVar("F", bound=Callable[..., Any])


class Accelerator(
    ProcessMixin,
    StateMixin,
    StepMixin,
    TrackerMixin,
    DataLoaderSettings,
    AccelerateStateMixin,
    PrepareOneMixin,
    ParallelismMixin,
):
    """Prepare models, optimizers, dataloaders and schedulers for the chosen strategy and precision.

    Arguments left at ``None`` take the value ``ember launch`` passed down (``--strategy``,
    ``--precision``), else ``strategy="auto"`` and ``precision="32-true"``.

    ``device_placement=False`` leaves prepared models and batches where they are (🤗 Accelerate's
    argument; ``prepare(..., device_placement=[...])`` decides per object).

    ``collective_timeout`` (seconds or a ``timedelta``; ``None`` turns it off) arms the collective
    watchdog of multi-process runs: a collective that some rank does not reach in time makes every
    rank print its Python stacks and ends the run with the names of the missing ranks.
    """

    def __init__(
        self,
        accelerator: str | None = None,
        strategy: str | Strategy | None = None,
        devices: int | str | Sequence[int] = "auto",
        precision: str | int | Precision | None = None,
        gradient_accumulation_steps: int = 1,
        seed: int | None = None,
        *,
        even_batches: bool | None = None,
        dataloader_config: DataLoaderConfiguration | None = None,
        mixed_precision: str | None = None,
        cpu: bool = False,
        device_placement: bool = True,
        log_with: LogWith = None,
        project_dir: str | os.PathLike[str] | None = None,
        project_config: ProjectConfiguration | None = None,
        step_scheduler_with_optimizer: bool = True,
        collective_timeout: float | timedelta | None = DEFAULT_COLLECTIVE_TIMEOUT,
        kwargs_handlers: Sequence[Any] | None = None,
        deepspeed_plugin: plugins.DeepSpeedPlugin | None = None,
        fsdp_plugin: plugins.FullyShardedDataParallelPlugin | None = None,
        gradient_accumulation_plugin: plugins.GradientAccumulationPlugin | None = None,
        dynamo_backend: str | None = None,
        dynamo_plugin: plugins.TorchDynamoPlugin | None = None,
        rng_types: Sequence[str] | None = None,
        # 🤗 Accelerate's, for what ember has not: each raises naming ember's way
        split_batches: bool | None = None,
        megatron_lm_plugin: Any = None,
        torch_tp_plugin: Any = None,
        parallelism_config: Any = None,
        deepspeed_plugins: Any = None,
    ) -> None:
        refuse_accelerate_only(
            split_batches=split_batches, megatron_lm_plugin=megatron_lm_plugin, torch_tp_plugin=torch_tp_plugin,
            parallelism_config=parallelism_config, deepspeed_plugins=deepspeed_plugins,
        )  # fmt: skip
        defaults = launch_defaults()
        handlers = kwargs_handlers_module.check_handlers(kwargs_handlers)
        watchdog_timeout = check_collective_timeout(collective_timeout)
        trackers = _trackers.check_log_with(log_with)
        check_bool("cpu", cpu)
        check_bool("device_placement", device_placement)
        loaders = check_dataloader_config(dataloader_config, even_batches)
        check_bool("step_scheduler_with_optimizer", step_scheduler_with_optimizer)
        check_path("project_dir", project_dir, optional=True)
        project = check_project(project_config, project_dir)
        if accelerator is not None:  # before `or` below: False or "" must not mean the default
            check_accelerator(accelerator)
        precision = kwargs_handlers_module.accelerate_precision(precision, mixed_precision)
        check_int("gradient_accumulation_steps", gradient_accumulation_steps, minimum=1)
        choice = resolve_plugins(
            strategy=strategy, precision=precision, gradient_accumulation_steps=gradient_accumulation_steps,
            deepspeed_plugin=deepspeed_plugin, fsdp_plugin=fsdp_plugin, dynamo_backend=dynamo_backend,
            gradient_accumulation_plugin=gradient_accumulation_plugin, dynamo_plugin=dynamo_plugin, rng_types=rng_types,
        )  # fmt: skip
        strategy, precision, gradient_accumulation_steps = choice.strategy, choice.precision, choice.steps
        if seed is not None:
            seed_everything(seed)

        # Everything is validated before any process is started.
        environment = detect_environment()
        requested = "cpu" if cpu else accelerator or defaults.get("accelerator", "auto")
        requested = check_accelerator(requested)
        devices = check_devices(devices)
        if environment.launched_externally:
            world_size = environment.world_size
        else:
            world_size = requested_processes(devices, requested)
        self._strategy = resolve_strategy(
            kwargs_handlers_module.ddp_strategy(
                handlers,
                strategy if strategy is not None else defaults.get("strategy", "auto"),
                world_size,
                requested,
            ),
            world_size=world_size,
            device_type=requested,
        )
        if environment.launched_externally:
            self._strategy.check_world_size(environment.world_size)
        device_type = resolve_accelerator(requested, self._strategy)
        choice.check(self._strategy, device_type)
        per_node = environment.local_world_size if environment.launched_externally else None
        num_processes, device_ids = resolve_devices(devices, device_type, per_node, self._strategy)
        precision_plugin = kwargs_handlers_module.handled_precision(
            handlers,
            resolve_precision(
                precision if precision is not None else defaults.get("precision", "32-true"),
                device_type=device_type,
            ),
            device_type,
        )
        if isinstance(self._strategy, OwnsOptimizerStep):  # its engine is configured with our accumulation
            self._strategy.gradient_accumulation_steps = gradient_accumulation_steps
        self._strategy.device_ids = device_ids
        # Armed in setup_environment by the strategies of several processes; the others ignore it.
        self._strategy.collective_timeout = watchdog_timeout
        self._strategy.connect(
            device_type=device_type,
            num_processes=num_processes,
            precision=precision_plugin,
            environment=environment,
        )
        self._strategy.launch()
        self._strategy.setup_environment()

        self._seed = seed
        self.device_placement = device_placement
        self._owns_step = isinstance(self._strategy, OwnsOptimizerStep)  # asked once, not every step
        self._direct_backward = self._strategy.direct_backward
        # False: the strategy wraps no module (call_as_forward need not ask it to unwrap one)
        self._unwraps = type(self._strategy).unwrap_module is not Strategy.unwrap_module
        self._wraps_forward = precision_plugin.wraps_forward  # False: call_as_forward has nothing to add
        self._unscales = type(precision_plugin).unscale_gradients is not Precision.unscale_gradients
        self._dataloader_config = loaders
        self._step_scheduler_with_optimizer = step_scheduler_with_optimizer
        self._gradient_state = choice.gradient_state()
        self._plugins = choice  # compiles prepared models, synchronises RNGs per dataloader pass
        self._compiles = choice.compile_kwargs is not None  # (asked by call_as_forward, every step)
        self._objects = _checkpoint.PreparedObjects()
        self.project_configuration = project
        self._several_nodes = environment.world_size > environment.local_world_size
        self._trackers = _trackers.Trackers(trackers, project.logging_dir)
        self._handlers = handlers  # (by kind: ddp_handler, scaler_handler, autocast_handler, profile())
        self.profile_handler = kwargs_handlers_module.handler(handlers, "ProfileKwargs")
        set_current(self)  # a PartialState made from now on describes these processes

    # -- where am I -----------------------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def precision(self) -> Precision:
        return self._strategy.precision

    @property
    def mixed_precision(self) -> str:
        """The precision in 🤗 Accelerate's words: ``"fp16"`` or ``"bf16"`` when the compute runs in
        that dtype (mixed or true half precision), else ``"no"``."""
        name = self._strategy.precision.name
        return "fp16" if name.startswith("16-") else "bf16" if name.startswith("bf16-") else "no"

    @property
    def project_dir(self) -> str | os.PathLike[str] | None:
        return self.project_configuration.project_dir

    @property
    def logging_dir(self) -> str | os.PathLike[str] | None:
        return self.project_configuration.logging_dir

    @property
    def save_iteration(self) -> int:
        """The number of the next automatically named checkpoint (``ProjectConfiguration.iteration``)."""
        return self.project_configuration.iteration

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, *objects: Any, device_placement: Sequence[bool] | None = None) -> Any:
        """Prepare each object for this run and return them in the same order (one object: itself).

        Models are converted to the precision, moved to the device and wrapped by the strategy;
        optimizers, schedulers and dataloaders are wrapped as described in ``docs/``.
        ``device_placement``: one bool per object (None: the Accelerator's ``device_placement``); False
        leaves a model, or a dataloader's batches, where they are (refused for a model under FSDP,
        DeepSpeed and XLA, which place parameters as they shard them).
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
        placed = device_placements(device_placement, len(objects), self.device_placement)
        model_slots = [i for i, o in enumerate(objects) if isinstance(o, nn.Module)]
        in_place = [i for i in model_slots if not placed[i]]
        if in_place:
            check_in_place(self._strategy, device_placement)
        optim_slots = [
            i
            for i, o in enumerate(objects)
            if isinstance(o, torch.optim.Optimizer) and not isinstance(o, PreparedOptimizer)
        ]
        if isinstance(self._strategy, OwnsOptimizerStep):  # before its engine is built
            for obj in objects:
                if _is_scheduler(obj) and not isinstance(obj, PreparedScheduler):
                    self._strategy.check_client_scheduler(obj)
        for slot, obj in enumerate(objects):  # first: a strategy may size its engine by the batch
            if isinstance(obj, DataLoader):
                result[slot] = self._prepare_dataloader(obj, placed=placed[slot])
        placed_models = [i for i in model_slots if placed[i]]
        if not isinstance(self._strategy, MaterializesModules):  # (a model left in place stays as it is)
            for i in placed_models:
                check_materialized(objects[i])
        models, optimizers = self._strategy.setup_module_and_optimizers(
            [objects[i] for i in placed_models], [objects[i] for i in optim_slots]
        )
        ready = dict(zip(placed_models, models, strict=True))
        for i in in_place:  # (checked above: the strategy can leave them where they are)
            ready[i] = cast(LeavesModulePlacement, self._strategy).setup_module_in_place(objects[i])
        for slot, model in sorted(ready.items()):  # in the order given: checkpoints keep it
            patch_forward(self._strategy.unwrap_module(model), self.precision)
            self._objects.models.append(model)
            # (checkpoints keep the uncompiled one)
            result[slot] = self._plugins.compiled(model, self._strategy)
        for slot, optimizer in zip(optim_slots, optimizers, strict=True):
            siblings = self._objects.optimizers  # (a scaler updates once all of them stepped)
            prepared_optimizer = PreparedOptimizer(optimizer, self._strategy, self._gradient_state, siblings)
            siblings.append(prepared_optimizer)
            result[slot] = prepared_optimizer
        for slot, obj in enumerate(objects):
            if _is_scheduler(obj) and not isinstance(obj, PreparedScheduler):
                prepared_scheduler = PreparedScheduler(
                    obj,
                    self._objects.optimizers,
                    self._gradient_state,
                    # (split_batches: the global batch does not grow with the processes, as Accelerate's)
                    steps_per_call=1 if self._dataloader_config.split_batches else self.num_processes,
                    with_optimizer=self._step_scheduler_with_optimizer,
                )
                self._objects.schedulers.append(prepared_scheduler)
                result[slot] = prepared_scheduler
        return result[0] if len(result) == 1 else tuple(result)

    def prepare_data_loader(
        self, dataloader: DataLoader[Any], device_placement: bool | None = None, *, shard: bool = True
    ) -> PreparedDataLoader:
        """Prepare one dataloader; ``shard=False`` keeps every batch on every process (the user shards)."""
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"prepare_data_loader() needs a torch.utils.data.DataLoader, got {type(dataloader).__name__}"
            )
        check_bool("device_placement", device_placement, owner="prepare_data_loader", optional=True)
        placed = self.device_placement if device_placement is None else device_placement
        return self._prepare_dataloader(dataloader, shard=shard, placed=placed)

    def _prepare_dataloader(
        self,
        dataloader: DataLoader[Any],
        shard: bool = True,
        to_device: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
        placed: bool = True,
        shard_samples: bool = False,
        unrepeated: bool = False,
    ) -> PreparedDataLoader:
        """``to_device``: moves a pass's batches (default: the strategy's ``batches_to_device``); the
        Trainer's, when the module overrides Lightning's batch-transfer hooks. ``placed=False``: not moved.
        ``shard_samples``: deal samples as Lightning's ``DistributedSampler`` (the Trainer's evaluation);
        ``unrepeated``: unpadded, as its ``UnrepeatedDistributedSampler`` (the Trainer's predict)."""
        # The shuffle seed must agree on every rank: rank 0's choice wins.
        config = self._dataloader_config
        seed = next(s for s in (config.data_seed, self._seed, torch.initial_seed() % 2**63) if s is not None)
        seed = int(self._strategy.broadcast(torch.tensor([seed], dtype=torch.int64), 0).item())
        move = (to_device or self._strategy.batches_to_device) if placed else None
        loader = PreparedDataLoader(
            dataloader,
            device=self.device if placed else None,
            to_device=self._plugins.synced(move, self._strategy),
            world_size=self.num_processes if shard else 1,
            rank=self.process_index if shard else 0,
            seed=seed,
            even_batches=config.even_batches,
            loop_state=self._gradient_state.loop,
            split_batches=config.split_batches and shard,
            shard_samples=shard_samples,
            unrepeated=unrepeated,
        )
        self._objects.dataloaders.append(loader)
        if isinstance(self._strategy, OwnsOptimizerStep) and self._strategy.micro_batch_size is None:
            size = dataloader.batch_size  # (split_batches: each process takes a slice of it)
            self._strategy.micro_batch_size = (
                size // self.num_processes if loader.split_batches and size else size
            )
        return loader

    @contextmanager
    def init_module(self, empty_init: bool = False) -> Iterator[None]:
        """Build modules inside this context in the precision's dtype, directly on the device.

        With ``empty_init=True`` and a strategy that can materialise modules (FSDP), layers are
        created on the meta device — no memory, no initialisation — and each process materialises
        only its shards in ``prepare`` (``reset_parameters()`` initialises them). Elsewhere
        ``empty_init`` changes nothing.
        """
        device = (
            torch.device("meta")
            if empty_init and isinstance(self._strategy, MaterializesModules)
            else self.device
        )
        with device, self.precision.module_init_context():
            yield

    call_as_forward = _forward.call_as_forward

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        return skip_first_batches(dataloader, num_batches)

    def end_training(self) -> None:
        """Finish the trackers, then release process groups; call once at the end of a script."""
        self._trackers.finish()
        self._strategy.teardown()
        forget(self)  # its processes are gone: a PartialState made after this sets up its own

    def __repr__(self) -> str:
        return f"Accelerator(strategy={self._strategy!r}, precision={self.precision!r})"


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))
