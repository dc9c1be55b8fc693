"""Strategies: how processes, models, optimizers, data, collectives and checkpoints work.

Names resolve through :data:`STRATEGY_REGISTRY`; each class registers its own names, so a new
backend is one new module plus one entry here.

Only what a single-device run uses is imported with ``ember``: the DDP, FSDP, DeepSpeed and XLA
modules, their base class `ParallelStrategy` with the collective watchdog (and what they import
from torch.distributed) load on first use, either of their class
(``from ember.strategies import FSDPStrategy``) or of one of their registry names (``"fsdp"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import defer_registration, lazy_exports
from ember.strategies.base import STRATEGY_REGISTRY, Strategy
from ember.strategies.capabilities import BackwardSyncControl
from ember.strategies.environment import ProcessEnvironment, detect_environment
from ember.strategies.single_device import SingleDeviceStrategy

if TYPE_CHECKING:
    from ember.strategies.ddp import DDPConfig, DDPStrategy
    from ember.strategies.deepspeed import DeepSpeedConfig, DeepSpeedStrategy
    from ember.strategies.fsdp import FSDPConfig, FSDPStrategy
    from ember.strategies.parallel import ParallelStrategy
    from ember.strategies.xla import XLAStrategy
    from ember.strategies.xla_spmd import XLASPMDConfig, XLASPMDStrategy

SingleDeviceStrategy.register_strategies(STRATEGY_REGISTRY)

# module -> (its strategy class, the registry names its ``register_strategies`` adds, its other public names)
_BACKENDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "ember.strategies.ddp": (
        "DDPStrategy",
        ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"),
        ("DDPConfig",),
    ),
    "ember.strategies.fsdp": (
        "FSDPStrategy",
        ("fsdp", "fsdp_offload", "fsdp_cpu_offload", "fsdp_shard_grad_op", "fsdp_hybrid"),
        ("FSDPConfig",),
    ),
    "ember.strategies.deepspeed": (
        "DeepSpeedStrategy",
        (
            "deepspeed",
            "deepspeed_stage_1",
            "deepspeed_stage_2",
            "deepspeed_stage_2_offload",
            "deepspeed_stage_3",
            "deepspeed_stage_3_offload",
        ),
        ("DeepSpeedConfig",),
    ),
    "ember.strategies.xla": ("XLAStrategy", ("xla",), ()),
    "ember.strategies.xla_spmd": ("XLASPMDStrategy", ("xla_spmd", "xla_fsdp"), ("XLASPMDConfig",)),
}
_LAZY = {name: module for module, (cls, _, others) in _BACKENDS.items() for name in (cls, *others)}
# The base of the strategies of several processes (and the collective watchdog it imports) too.
_LAZY["ParallelStrategy"] = "ember.strategies.parallel"


for _module, (_cls, _names, _) in _BACKENDS.items():
    defer_registration(STRATEGY_REGISTRY, _names, _module, _cls, "register_strategies")


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "STRATEGY_REGISTRY",
    "BackwardSyncControl",
    "DDPConfig",
    "DDPStrategy",
    "DeepSpeedConfig",
    "DeepSpeedStrategy",
    "FSDPConfig",
    "FSDPStrategy",
    "ParallelStrategy",
    "ProcessEnvironment",
    "SingleDeviceStrategy",
    "Strategy",
    "XLASPMDConfig",
    "XLASPMDStrategy",
    "XLAStrategy",
    "detect_environment",
]
