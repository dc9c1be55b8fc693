"""One process drives every local XLA device through torch_xla's SPMD partitioner (``"xla_spmd"``,
``"xla_fsdp"``): the batch is sharded over a 1-D ``("data",)`` mesh; with ``shard_parameters`` the
parameters (and so the optimizer state) are sharded over it too, and the compiler inserts the
collectives. What it shares with the one-process-per-device :class:`~ember.strategies.XLAStrategy`
(the device, the precisions, the graph cut after the optimizer step) is in ``strategies/xla.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember._tree import apply_to_tensors
from ember.precision import Precision
from ember.strategies.base import Strategy
from ember.strategies.environment import ProcessEnvironment, xla_cpu_devices
from ember.strategies.xla import (
    XLAStep,
    check_precision,
    import_torch_xla,
    pjrt_device,
    runtime_started,
    xla_sync,
)

__all__ = ["XLASPMDConfig", "XLASPMDStrategy"]


@dataclass(kw_only=True, slots=True, frozen=True)
class XLASPMDConfig:
    """Options of :class:`XLASPMDStrategy`.

    ``shard_parameters``: shard every parameter's first dimension over the devices (FSDP-style, by
    sharding annotations); optimizer state follows its parameter. Off: parameters are replicated
    and only the batch is sharded (data parallel).
    """

    shard_parameters: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.shard_parameters, bool):
            raise ValueError(f"shard_parameters={self.shard_parameters!r} must be True or False")


class XLASPMDStrategy(XLAStep):
    """One process drives all local XLA devices through torch_xla's SPMD partitioner.

    Each batch of a prepared dataloader is the *global* batch: it is split along its first
    dimension over the devices. Example::

        accelerator = Accelerator(strategy="xla_spmd", devices=2)  # on CPU: 2 virtual XLA devices
        trainer = Trainer(strategy="xla_fsdp")                      # every device, parameters sharded
    """

    strategy_name = "xla_spmd"

    def __init__(self, config: XLASPMDConfig | None = None) -> None:
        super().__init__()
        self.config = config or XLASPMDConfig()
        self._mesh: Any = None

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("xla_spmd", cls, "one process, all XLA devices: SPMD data parallel")
        registry.register(
            "xla_fsdp",
            cls,
            "xla_spmd with parameters sharded over the devices",
            config=XLASPMDConfig(shard_parameters=True),
        )

    @override
    def auto_num_devices(self) -> int:
        if runtime_started():
            import torch_xla.runtime as xr

            return int(xr.global_runtime_device_count())
        if pjrt_device() == "CPU":
            return xla_cpu_devices()
        return 0  # every device: counted in setup_environment, once SPMD mode is on

    @override
    def check_world_size(self, world_size: int) -> None:
        if world_size > 1:
            raise ValueError(
                f"strategy={self.strategy_name!r} runs one process that drives every device, not {world_size}: "
                "start the script with plain `python` and pass devices=N (or use strategy='xla' for one process "
                "per device)"
            )

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        check_precision(self.strategy_name, precision)
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )

    @property
    def num_devices(self) -> int:
        """Devices the mesh spans (known after ``setup_environment``)."""
        return int(self._mesh.size()) if self._mesh is not None else self._num_processes

    @override
    def setup_environment(self) -> None:
        import_torch_xla()
        import numpy as np
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        wanted = self._num_processes  # 0: every device
        if not runtime_started() and pjrt_device() == "CPU" and wanted > 0:
            os.environ["CPU_NUM_DEVICES"] = str(wanted)  # virtual devices, fixed when the runtime starts
        xr.use_spmd()
        count = int(xr.global_runtime_device_count())
        if wanted > 0 and count != wanted:
            raise ValueError(
                f"devices={wanted}, but the XLA runtime has {count} devices (it started before this "
                "Accelerator; set CPU_NUM_DEVICES or TPU chips before any XLA tensor is made, or pass devices='auto')"
            )
        self._mesh = xs.Mesh(np.arange(count), (count,), ("data",))
        xs.set_global_mesh(self._mesh)
        self._device = torch_xla.device()

    @override
    def teardown(self) -> None:
        if self._device is not None:
            xla_sync()

    def _shard_first_dim(self, tensor: torch.Tensor) -> None:
        import torch_xla.distributed.spmd as xs

        if tensor.dim() > 0:
            xs.mark_sharding(tensor, self._mesh, ("data",) + (None,) * (tensor.dim() - 1))

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        module = super().setup_module(module)
        if self.config.shard_parameters:
            for parameter in module.parameters():
                self._shard_first_dim(parameter)
        return module

    @override
    def batches_to_device(self, batches: Iterable[Any]) -> Iterable[Any]:
        device = self.root_device

        def place(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(device)
            self._shard_first_dim(tensor)  # the batch dimension is split over the devices
            return tensor

        return (apply_to_tensors(batch, place) for batch in batches)
