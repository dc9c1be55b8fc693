"""``DeviceStatsMonitor``: log the device's memory statistics (and the host's CPU use) during the fit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember._validation import check_bool
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["DeviceStatsMonitor"]

_BATCH_HOOKS = frozenset(
    f"on_{stage}_batch_{when}" for stage in ("train", "validation", "test") for when in ("start", "end")
)


class _CPUStats:
    """Lightning's CPU statistics, in percent: ``cpu_vm_percent`` (memory in use), ``cpu_percent``
    (every core's busy time since the previous reading) and ``cpu_swap_percent``.

    Read with psutil when it is installed, the values Lightning logs; else from ``/proc`` (Linux),
    computed as psutil does there. Neither (psutil missing on another system): ``ModuleNotFoundError``.
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        self._psutil: Any = psutil
        self._proc = proc
        if psutil is not None:
            psutil.cpu_percent()  # the baseline of the first reading: from now on
            return
        if not (proc / "meminfo").is_file() or not (proc / "stat").is_file():
            raise ModuleNotFoundError(
                "DeviceStatsMonitor logs CPU statistics with psutil, which is not installed, or from /proc, which "
                "this system does not have: pip install psutil, or DeviceStatsMonitor(cpu_stats=False)"
            )
        self._times = self._cpu_times()

    def read(self) -> dict[str, float]:
        psutil = self._psutil
        if psutil is not None:
            return {
                "cpu_vm_percent": float(psutil.virtual_memory().percent),
                "cpu_percent": float(psutil.cpu_percent()),
                "cpu_swap_percent": float(psutil.swap_memory().percent),
            }
        memory = self._meminfo()
        busy, total = self._cpu_times()
        previous_busy, previous_total = self._times
        self._times = (busy, total)
        elapsed = total - previous_total
        return {
            "cpu_vm_percent": _percent(memory["MemTotal"] - memory["MemAvailable"], memory["MemTotal"]),
            "cpu_percent": _percent(max(busy - previous_busy, 0), elapsed) if elapsed > 0 else 0.0,
            "cpu_swap_percent": _percent(memory["SwapTotal"] - memory["SwapFree"], memory["SwapTotal"]),
        }

    def _meminfo(self) -> dict[str, int]:
        values = {}
        for line in (self._proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[name] = int(fields[0])
        return values

    def _cpu_times(self) -> tuple[int, int]:
        """(busy, total) clock ticks of all cores: busy leaves out idle and iowait; total leaves out
        guest time, which the kernel already counts in user time (as psutil does)."""
        fields = [int(f) for f in (self._proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return total - idle, total


def _percent(used: float, total: float) -> float:
    return round(100.0 * used / total, 1) if total > 0 else 0.0


def _device_stats(device: torch.device) -> dict[str, float]:
    """Memory statistics of ``device``: ``torch.cuda.memory_stats`` on CUDA (Lightning's keys, such
    as ``allocated_bytes.all.current``), ``torch.accelerator.memory_stats`` on another accelerator
    that torch's generic API covers; none on the CPU (its statistics are :class:`_CPUStats`)."""
    if device.type == "cpu":
        return {}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
    else:
        current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if current is None or current.type != device.type:
            return {}
        try:
            stats = torch.accelerator.memory_stats(device)
        except (RuntimeError, NotImplementedError, TypeError):  # a backend without allocator statistics
            return {}
    return {key: float(value) for key, value in stats.items() if isinstance(value, (int, float))}


class DeviceStatsMonitor(Callback):
    """Log device statistics through the Trainer's loggers, on global rank 0, around the training,
    validation and test batches whose values the Trainer logs (``trainer.logs_this_batch`` in training,
    every ``log_every_n_steps``-th batch in evaluation).

    Keys are ``DeviceStatsMonitor.<hook>/<statistic>``, ``<hook>`` being ``on_train_batch_start``,
    ``on_train_batch_end`` and their validation and test counterparts. On CUDA the statistics are
    ``torch.cuda.memory_stats``; on the CPU (``cpu_stats=None``) and, with ``cpu_stats=True``,
    beside a device's, ``cpu_vm_percent``, ``cpu_percent`` and ``cpu_swap_percent``.
    ``cpu_stats=False`` logs no CPU statistics (on the CPU: nothing).

    Example::

        trainer = Trainer(logger=CSVLogger("logs"), callbacks=[DeviceStatsMonitor()])
        trainer.fit(module, loader)  # metrics.csv: DeviceStatsMonitor.on_train_batch_end/cpu_percent, ...
    """

    def __init__(self, cpu_stats: bool | None = None) -> None:
        check_bool("cpu_stats", cpu_stats, owner="DeviceStatsMonitor", optional=True)
        self._cpu_stats = cpu_stats
        self._cpu: _CPUStats | None = None
        self._device = torch.device("cpu")

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise RuntimeError(
                "DeviceStatsMonitor logs through the Trainer's loggers, and it has none: pass "
                "Trainer(logger=CSVLogger(...)) or another, or remove the callback"
            )
        self._device = trainer.strategy.root_device
        wants_cpu = self._cpu_stats or (self._cpu_stats is None and self._device.type == "cpu")
        if wants_cpu and self._cpu is None and trainer.is_global_zero:
            self._cpu = _CPUStats()  # raises here, before training, when no reader exists
        if not wants_cpu:
            self._cpu = None

    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        # Only rank 0 writes to the loggers; on the CPU with cpu_stats=False there is nothing to log.
        if not trainer.is_global_zero or (self._cpu is None and self._device.type == "cpu"):
            return _BATCH_HOOKS
        return frozenset()

    def _log(self, trainer: Trainer, hook: str) -> None:
        stats = _device_stats(self._device)
        if self._cpu is not None:
            stats.update(self._cpu.read())
        if stats:
            prefix = f"{type(self).__qualname__}.{hook}/"
            trainer.log_metrics(
                {prefix + key: value for key, value in stats.items()}, step=trainer.global_step
            )

    # -- when: the training batches whose row the Trainer writes --------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if trainer.logs_this_batch:
            self._log(trainer, "on_train_batch_start")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.logs_this_batch:
            self._log(trainer, "on_train_batch_end")

    def _evaluation(self, trainer: Trainer, hook: str, batch_idx: int) -> None:
        if not trainer.sanity_checking and (batch_idx + 1) % trainer.log_every_n_steps == 0:
            self._log(trainer, hook)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluation(trainer, "on_validation_batch_start", batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation(trainer, "on_validation_batch_end", batch_idx)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluation(trainer, "on_test_batch_start", batch_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation(trainer, "on_test_batch_end", batch_idx)
