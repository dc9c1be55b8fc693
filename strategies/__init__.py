"""Strategies: how processes, models, optimizers, data, collectives and checkpoints work.

Names resolve through :data:`STRATEGY_REGISTRY`; each class registers its own names, so a new
backend is one new module plus one line here.
"""

from ember.strategies.base import STRATEGY_REGISTRY, Strategy
from ember.strategies.capabilities import BackwardSyncControl
from ember.strategies.ddp import DDPConfig, DDPStrategy
from ember.strategies.deepspeed import DeepSpeedConfig, DeepSpeedStrategy
from ember.strategies.environment import ProcessEnvironment, detect_environment
from ember.strategies.fsdp import FSDPConfig, FSDPStrategy
from ember.strategies.parallel import ParallelStrategy
from ember.strategies.single_device import SingleDeviceStrategy
from ember.strategies.xla import XLAStrategy
from ember.strategies.xla_spmd import XLASPMDConfig, XLASPMDStrategy

for _strategy in (
    SingleDeviceStrategy,
    DDPStrategy,
    FSDPStrategy,
    DeepSpeedStrategy,
    XLAStrategy,
    XLASPMDStrategy,
):
    _strategy.register_strategies(STRATEGY_REGISTRY)

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
