"""How the plugins refuse a field ember cannot honour."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember._validation import show


def refuse(plugin: str, name: str, value: Any, valid: str, why: str) -> ValueError:
    return ValueError(f"{plugin}({name}={show(value)}) is not supported: {why}. Valid choices: {valid}")


def only(plugin: str, name: str, value: Any, allowed: Sequence[Any], why: str) -> None:
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise refuse(plugin, name, value, ", ".join(map(repr, allowed)), why)


def offload(plugin: str, name: str, value: Any) -> bool:
    if value is None or value == "none":
        return False
    if value == "cpu":
        return True
    why = "ember offloads to the CPU only" if value == "nvme" else "unknown device"
    raise refuse(plugin, name, value, "'none', 'cpu'", why)
