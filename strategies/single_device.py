"""One process, one device."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember.precision import Precision
from ember.strategies.base import Strategy
from ember.strategies.capabilities import LeavesModulePlacement
from ember.strategies.environment import ProcessEnvironment


class SingleDeviceStrategy(Strategy, LeavesModulePlacement):
    """Everything on one device in this process; collectives are identities."""

    strategy_name = "single_device"

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("single_device", cls, "one process on one device")

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        if num_processes != 1 or environment.world_size != 1:
            raise ValueError(
                f"strategy='single_device' runs one process, but devices={num_processes} and the launcher "
                f"started WORLD_SIZE={environment.world_size}. Use strategy='ddp' (or 'auto') for several."
            )
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )

    @override
    def setup_module_in_place(self, module: nn.Module) -> nn.Module:
        return self.precision.convert_module(module)
