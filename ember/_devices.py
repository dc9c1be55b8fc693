"""Which device type and how many devices an :class:`~ember.Accelerator` runs on: the checks of its
``accelerator`` and ``devices`` arguments and their resolution against the strategy. Importing it
does not import torch: ``ember launch`` checks ``--accelerator`` with :data:`ACCELERATORS` before it
starts anything."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.strategies import Strategy

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "xla")  # "gpu": Lightning's name for "cuda"


def check_accelerator(accelerator: str) -> str:
    """Check an ``accelerator`` argument; returns its canonical name (``"gpu"`` is ``"cuda"``)."""
    if accelerator not in ACCELERATORS:
        raise ValueError(
            f"accelerator={accelerator!r} is not supported. Valid choices: {', '.join(map(repr, ACCELERATORS))}"
        )
    return "cuda" if accelerator == "gpu" else accelerator


def resolve_accelerator(accelerator: str, strategy: Strategy) -> str:
    """The device type: the strategy's own (XLA), else ``accelerator`` with ``"auto"`` resolved."""
    import torch

    if strategy.accelerator is not None:
        if accelerator not in ("auto", strategy.accelerator):
            raise ValueError(
                f"accelerator={accelerator!r} does not fit strategy={strategy.strategy_name!r}, which runs on "
                f"accelerator={strategy.accelerator!r}. Valid choices: 'auto', {strategy.accelerator!r}"
            )
        return strategy.accelerator
    if accelerator == "xla":
        raise ValueError(
            f"accelerator='xla' needs an XLA strategy, not strategy={strategy.strategy_name!r}. "
            "Valid choices: 'xla', 'xla_spmd', 'xla_fsdp' (or 'auto')"
        )
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "accelerator='cuda' was requested, but torch.cuda.is_available() is False on this machine"
        )
    return accelerator


def check_devices(devices: int | str) -> None:
    if devices != "auto" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices={devices!r} must be a positive int or 'auto'")


def resolve_devices(
    devices: int | str, device_type: str, launched_per_node: int | None, strategy: Strategy
) -> int:
    import torch

    if devices == "auto":
        return launched_per_node or strategy.auto_num_devices()
    assert isinstance(devices, int)  # checked by check_devices
    if device_type == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices={devices}, but only {torch.cuda.device_count()} CUDA devices are visible")
    return devices
