"""Which device type and how many devices an :class:`~ember.Accelerator` runs on: the checks of its
``accelerator`` and ``devices`` arguments and their resolution against the strategy. Importing it
does not import torch: ``ember launch`` checks ``--accelerator`` with :data:`ACCELERATORS` before it
starts anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


DEVICES_CHOICES = (
    "a positive int (the number of processes), -1 (every GPU), 'auto', a list of GPU indices such as "
    "[0, 1], or a string of one of those ('2', '-1', '0,1')"
)


def check_devices(devices: Any) -> int | str | tuple[int, ...]:
    """Check a ``devices`` argument in Lightning's forms; returns it as ``"auto"``, a count (>= 1),
    -1 (every device) or a tuple of device indices."""
    value = devices
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return "auto"
        if "," in text:  # "0,1" or "1,": indices
            parts = [part.strip() for part in text.split(",") if part.strip()]
            if parts and all(part.isdigit() for part in parts):
                value = [int(part) for part in parts]
        elif text.isdigit() or (text.startswith("-") and text[1:].isdigit()):
            value = int(text)
    if isinstance(value, (list, tuple)):
        indices = tuple(value)
        if (
            indices
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
            and len(set(indices)) == len(indices)
        ):
            return indices
    elif isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1):
        return value
    raise ValueError(f"devices={devices!r} is not valid. Valid choices: {DEVICES_CHOICES}")


def requested_processes(devices: int | str | tuple[int, ...], requested: str) -> int:
    """How many processes the checked ``devices`` asks for, before the strategy is chosen (-1 on CUDA:
    every GPU; the strategy and device checks come after)."""
    import torch

    if isinstance(devices, tuple):
        return len(devices)
    if devices == -1:
        cuda = requested in ("cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if cuda else 1
    return devices if isinstance(devices, int) else 1


def resolve_devices(
    devices: int | str | tuple[int, ...], device_type: str, launched_per_node: int | None, strategy: Strategy
) -> tuple[int, tuple[int, ...] | None]:
    """``(processes per node, the GPU index of each local process or None: the local rank's)``."""
    import torch

    if devices == "auto":
        return launched_per_node or strategy.auto_num_devices(), None
    if isinstance(devices, tuple) or devices == -1:
        if device_type != "cuda":
            raise ValueError(
                f"devices={devices!r} selects GPUs, but the accelerator is {device_type!r}: give the number "
                "of processes (devices=2) or 'auto'"
            )
        visible = torch.cuda.device_count()
        if devices == -1:
            return visible, None
        assert isinstance(devices, tuple)
        missing = [i for i in devices if i >= visible]
        if missing:
            raise ValueError(
                f"devices={list(devices)} names GPU {missing[0]}, but only {visible} CUDA devices are "
                f"visible (indices 0 to {visible - 1})"
            )
        if launched_per_node is not None and launched_per_node != len(devices):
            raise ValueError(
                f"devices={list(devices)} names {len(devices)} GPUs, but the launcher started "
                f"{launched_per_node} processes on this node: one GPU per process"
            )
        return len(devices), devices
    assert isinstance(devices, int)  # checked by check_devices
    if device_type == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices={devices}, but only {torch.cuda.device_count()} CUDA devices are visible")
    return devices, None


def device_placements(device_placement: Any, count: int, default: bool) -> list[bool]:
    """``prepare``'s ``device_placement``: one bool per object (None: ``default`` for each)."""
    if device_placement is None:
        return [default] * count
    if not (
        isinstance(device_placement, (list, tuple))
        and len(device_placement) == count
        and all(isinstance(place, bool) for place in device_placement)
    ):
        raise ValueError(
            f"prepare(device_placement={device_placement!r}): expected a list of {count} bools, one per object "
            "passed (True: moved to the device, False: left where it is), or None for the Accelerator's "
            "device_placement"
        )
    return list(device_placement)


def check_in_place(strategy: Strategy, device_placement: Any) -> None:
    """Raise unless ``strategy`` can prepare a model where it is (``device_placement`` False for it)."""
    from ember.strategies.capabilities import LeavesModulePlacement

    if not isinstance(strategy, LeavesModulePlacement):
        given = (
            "Accelerator(device_placement=False)"
            if device_placement is None
            else f"prepare(device_placement={device_placement!r})"
        )
        raise ValueError(
            f"{given}: strategy {strategy.strategy_name!r} places a model's parameters itself as it shards "
            "them, so a model cannot stay where it is. Valid choices for a model under it: True"
        )
