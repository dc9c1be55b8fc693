"""Fully sharded data parallel on PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor).

Each parameter is split along its first dimension across the processes; a shard unit gathers its
full parameters just before it runs and frees them after (``reshard_after_forward``). Which
submodules become their own unit is the wrapping policy — chosen here, not by the user's model code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_bool, check_choice, check_int, check_process_group, show
from ember.precision import HalfPrecision, MixedPrecision, Precision
from ember.strategies.base import Strategy, setup_rebinding_optimizers
from ember.strategies.capabilities import BackwardSyncControl, MaterializesModules
from ember.strategies.environment import ProcessEnvironment
from ember.strategies.fsdp_names import check_device_mesh, refuse_foreign_options
from ember.strategies.fsdp_units import (
    ModuleSpec,
    is_selection,
    reset_sharded,
    resolve_classes,
    selected_modules,
    size_based_units,
    split_tie,
    tied_parameters,
)
from ember.strategies.optim_state import is_named, parameter_names, to_named
from ember.strategies.options import config_of

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

# torch.distributed.fsdp, DTensor and the distributed state-dict API take ~0.7 s to import: they
# are imported where FSDP runs, so `import ember` stays cheap for everyone else.
from ember.strategies.parallel import ParallelStrategy

__all__ = ["FSDPConfig", "FSDPStrategy"]

# A set of module classes (or their names), a predicate module -> bool, or one of torch's FSDP1 wrapping
# policies (ModuleWrapPolicy, CustomPolicy, functools.partial(size_based_auto_wrap_policy, ...)).
Selection = ModuleSpec | Callable[..., Any]
WrapPolicy = str | Selection | None


@dataclass(kw_only=True, slots=True, frozen=True)
class FSDPConfig:
    """Options of :class:`FSDPStrategy`.

    ``wrap``: which submodules become their own shard unit — ``"auto"`` (bottom-up, a module whose
    parameters not yet in a unit reach ``min_params``), a set of module classes (or class names, looked
    up in the model when it is prepared: a name no submodule has is an error), a predicate
    ``module -> bool``, one of torch's FSDP1 wrapping policies (as Lightning's ``auto_wrap_policy``),
    or ``None`` (only the root). The root is always
    sharded. ``reshard_after_forward=False`` keeps gathered parameters until backward (ZeRO-2 like).
    ``offload`` keeps parameters, gradients and optimizer state on the CPU. ``activation_checkpointing``
    recomputes the activations of the modules it selects in backward (the forms of ``wrap``, less
    ``"auto"`` and ``None``). ``reduce_dtype`` overrides the
    gradient reduction dtype the precision implies. ``hybrid`` shards within each node and
    replicates across nodes (a 2-D device mesh; ``None``: when the job spans several nodes);
    ``device_mesh=(replicas, shards)`` gives that mesh's shape (their product is the world size).
    ``state_dict_type``: ``"sharded"`` checkpoints (each rank writes its shards) or ``"full"``
    (rank 0 writes full tensors).
    """

    wrap: WrapPolicy = "auto"
    min_params: int = 100_000
    reshard_after_forward: bool = True
    offload: bool = False
    activation_checkpointing: Selection = field(default_factory=set)
    reduce_dtype: torch.dtype | None = None
    hybrid: bool | None = None
    device_mesh: tuple[int, int] | None = None
    state_dict_type: Literal["sharded", "full"] = "sharded"
    process_group_backend: str | None = None
    timeout: timedelta = field(default_factory=lambda: timedelta(minutes=30))

    def __new__(cls, *args: Any, **options: Any) -> FSDPConfig:
        # Before the generated __init__, whose TypeError would only say "unexpected keyword argument":
        # Lightning's and FSDP1's option names say what FSDPConfig calls them.
        refuse_foreign_options("FSDPConfig", options, _FIELDS)
        return object.__new__(cls)  # (a slots dataclass is a new class: no zero-argument super())

    def __post_init__(self) -> None:
        if not (self.wrap is None or self.wrap == "auto" or is_selection(self.wrap)):
            raise ValueError(
                f"wrap={show(self.wrap)}: use 'auto', a set of nn.Module classes or class names, a callable "
                "(a predicate module -> bool or a torch wrapping policy) or None"
            )
        check_int("min_params", self.min_params, minimum=1, owner="FSDPConfig")
        if not is_selection(self.activation_checkpointing):
            raise ValueError(
                f"activation_checkpointing={show(self.activation_checkpointing)} must be a set of nn.Module classes "
                "or class names, or a callable (a predicate module -> bool or a torch wrapping policy)"
            )
        check_choice("state_dict_type", self.state_dict_type, ("sharded", "full"), owner="FSDPConfig")
        check_bool("hybrid", self.hybrid, optional=True, owner="FSDPConfig")
        check_device_mesh(self.device_mesh, self.hybrid)
        for name in ("reshard_after_forward", "offload"):
            check_bool(name, getattr(self, name), owner="FSDPConfig")
        if self.reduce_dtype is not None and not (
            isinstance(self.reduce_dtype, torch.dtype) and self.reduce_dtype.is_floating_point
        ):
            raise ValueError(
                f"reduce_dtype={show(self.reduce_dtype)} must be None or a floating-point torch.dtype"
            )
        check_process_group(self.process_group_backend, self.timeout, owner="FSDPConfig")


_FIELDS = tuple(FSDPConfig.__dataclass_fields__)


class FSDPStrategy(ParallelStrategy, BackwardSyncControl, MaterializesModules):
    """Shard parameters, gradients and optimizer state across processes.

    Example::

        Trainer(strategy=FSDPStrategy(FSDPConfig(wrap={Block}, activation_checkpointing={Block})), devices=2)
    """

    evaluates_in_inference_mode = False
    supports_weight_averaging = False
    supports_trainable_refresh = False

    strategy_name = "fsdp"

    def __init__(self, config: FSDPConfig | None = None, **options: Any) -> None:
        refuse_foreign_options("FSDPStrategy", options, _FIELDS)  # Lightning's FSDPStrategy(cpu_offload=...)
        self.config = config_of("FSDPStrategy", FSDPConfig, config, options)  # FSDPStrategy(offload=True) too
        super().__init__(process_group_backend=self.config.process_group_backend, timeout=self.config.timeout)
        self._device_mesh: DeviceMesh | None = None

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("fsdp", cls, "FSDP2: parameters, gradients and optimizer state sharded")
        registry.register(
            "fsdp_offload", cls, "fsdp with everything offloaded to the CPU", config=FSDPConfig(offload=True)
        )
        registry.register(
            "fsdp_cpu_offload", cls, "fsdp_offload, by Lightning's name", config=FSDPConfig(offload=True)
        )
        registry.register(
            "fsdp_shard_grad_op",
            cls,
            "fsdp keeping gathered parameters from forward to backward (ZeRO-2 like)",
            config=FSDPConfig(reshard_after_forward=False),
        )
        registry.register(
            "fsdp_hybrid",
            cls,
            "fsdp sharding within each node and replicating across nodes (2-D mesh)",
            config=FSDPConfig(hybrid=True),
        )

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )
        self._mp_policy()  # contradictory precision settings fail here, before any process starts
        mesh = self.config.device_mesh
        if mesh is not None and mesh[0] * mesh[1] != environment.world_size:
            raise ValueError(
                f"FSDPConfig(device_mesh={mesh}) has {mesh[0] * mesh[1]} processes, but this job has "
                f"{environment.world_size}: replicas x shards must be the world size"
            )

    # -- precision: one source of truth ----------------------------------------------------------
    def _mp_policy(self) -> MixedPrecisionPolicy:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision, reduce = self.precision, self.config.reduce_dtype
        if isinstance(precision, MixedPrecision):
            # fp32 sharded master weights; forward/backward on low-precision gathered copies.
            return MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=reduce or torch.float32)
        if isinstance(precision, HalfPrecision):
            if reduce is not None and reduce != precision.dtype:
                raise ValueError(
                    f"precision={precision.name!r} keeps everything in {precision.dtype}, but FSDPConfig(reduce_dtype="
                    f"{reduce}) asks for another reduction dtype; use a '-mixed' precision for that"
                )
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(reduce_dtype=reduce)

    # -- sharding ---------------------------------------------------------------------------------
    @property
    def device_mesh(self) -> DeviceMesh:
        """The mesh parameters are sharded over: 1-D over all ranks, or ``("replicate", "shard")``
        = (nodes, processes per node) for hybrid sharding."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._device_mesh is None:
            env = self._environment
            hybrid = (
                self.config.hybrid
                if self.config.hybrid is not None
                else env.world_size > env.local_world_size
            )
            if self.config.device_mesh is not None:  # its size was checked in connect()
                self._device_mesh = init_device_mesh(
                    self._device_type, self.config.device_mesh, mesh_dim_names=("replicate", "shard")
                )
            elif hybrid:
                if env.world_size % env.local_world_size:
                    raise ValueError(
                        f"hybrid sharding needs the same number of processes on every node; world size "
                        f"{env.world_size} is not a multiple of {env.local_world_size} processes per node"
                    )
                shape = (env.world_size // env.local_world_size, env.local_world_size)
                self._device_mesh = init_device_mesh(
                    self._device_type, shape, mesh_dim_names=("replicate", "shard")
                )
            else:
                self._device_mesh = init_device_mesh(
                    self._device_type, (env.world_size,), mesh_dim_names=("shard",)
                )
        return self._device_mesh

    def _units(self, root: nn.Module) -> list[nn.Module]:
        """Submodules that become their own shard unit, children before parents."""
        wrap = self.config.wrap
        if wrap is None:
            return []
        ties = tied_parameters(root)
        if wrap == "auto":
            return size_based_units(root, self.config.min_params, ties)
        units = selected_modules(root, wrap, "wrap")
        for unit in units:
            split = split_tie(unit, ties)
            if split is not None:  # FSDP2 would raise at the first forward, naming an API ember hides
                raise ValueError(
                    f"FSDPConfig(wrap=...): {split[0]!r} is the same parameter as {split[1]!r} (tied weights), but "
                    f"the {type(unit).__name__} holding only the first would be its own shard unit. A tied "
                    "parameter must be in one unit: leave that class out of wrap, or use wrap='auto'"
                )
        return units

    @override
    def setup_module_and_optimizers(
        self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        # fully_shard replaces each parameter by a sharded one.
        return setup_rebinding_optimizers(self, modules, optimizers)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if not isinstance(
            self.precision, MixedPrecision
        ):  # 16-true, bf16-true, 64-true: the module's own dtype
            module = self.precision.convert_module(module)
        if self.config.activation_checkpointing:
            from torch.distributed._composable import checkpoint  # type: ignore[attr-defined]

            # Before sharding (torchtitan's order): recompute each block's activations in backward.
            spec = self.config.activation_checkpointing
            blocks = selected_modules(module, spec, "activation_checkpointing")
            if isinstance(spec, (set, frozenset)) and isinstance(
                module, resolve_classes(module, spec, "activation_checkpointing")
            ):
                blocks.append(module)  # a set of classes selects the root too (a policy never does)
            for block in blocks:
                checkpoint(block)
        offload: OffloadPolicy = (
            CPUOffloadPolicy(pin_memory=self._device_type == "cuda")
            if self.config.offload
            else OffloadPolicy()
        )
        options: dict[str, Any] = {
            "reshard_after_forward": self.config.reshard_after_forward,
            "mp_policy": self._mp_policy(),
            "offload_policy": offload,
            "mesh": self.device_mesh,
        }
        # Only the submodules built on the meta device are materialised (a pretrained part keeps its weights).
        on_meta = [
            m for m in module.modules() if any(t.is_meta for t in [*m.parameters(False), *m.buffers(False)])
        ]
        if not on_meta and not self.config.offload:
            module = module.to(self.root_device)
        for unit in self._units(module):
            fully_shard(unit, **options)
        fully_shard(module, **options)
        if on_meta:  # built without memory: each rank materialises only its shards
            device = torch.device("cpu") if self.config.offload else self.root_device
            # to_empty(), sparing what is not on meta (FSDP's units re-read their shards after _apply).
            module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
            for sub in on_meta:
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset_sharded(sub, reset)
        return module

    @override
    @contextmanager
    def no_backward_sync(self, module: nn.Module) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            raise TypeError(
                f"no_backward_sync needs a module prepared by FSDPStrategy, got {type(module).__name__}"
            )
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    @override
    def clip_gradients_norm(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        max_norm: float,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        norm = super().clip_gradients_norm(parameters, optimizers, max_norm, norm_type)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the total norm over all shards

    # -- state ------------------------------------------------------------------------------------
    @property
    @override
    def sharded_checkpoints(self) -> bool:
        return self.config.state_dict_type == "sharded"

    @override
    def module_state_dict(self, module: nn.Module, *, full: bool = True) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=full, cpu_offload=full)
        state: dict[str, torch.Tensor] = get_model_state_dict(module, options=options)  # type: ignore[assignment]
        return state  # full: a collective, tensors on rank 0; sharded: this rank's DTensors

    @override
    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(v, DTensor) for v in state.values())
        options = StateDictOptions(full_state_dict=not sharded, strict=strict)
        set_model_state_dict(module, dict(state), options=options)

    @override
    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None, *, full: bool = True
    ) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=full, cpu_offload=full)
        return get_optimizer_state_dict(_require(module), optimizer, options=options)  # keyed by name

    @override
    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None, state: dict[str, Any]
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.tensor import DTensor

        model = _require(module)
        if not is_named(state):  # saved by position (e.g. outside ember): name the parameters
            names = parameter_names(model, optimizer)
            assert names is not None  # _require: the model holds every parameter
            state = to_named(state, names)
        sharded = any(
            isinstance(v, DTensor) for per_param in state["state"].values() for v in per_param.values()
        )
        set_optimizer_state_dict(
            model, optimizer, dict(state), options=StateDictOptions(full_state_dict=not sharded)
        )


def _require(module: nn.Module | None) -> nn.Module:
    if module is None:
        raise ValueError("FSDP: prepare() the optimizer together with the model whose parameters it holds")
    return module
