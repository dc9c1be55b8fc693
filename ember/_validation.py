"""Checks of constructor arguments, shared by the public constructors.

Each raises before anything is created, naming the argument (and its owner, if given): a value of
the wrong type is a ``TypeError``, a value of the right type out of range a ``ValueError``.
``bool`` is never accepted where a number is expected, nor a number where a ``bool`` is::

    check_int("patience", patience, minimum=0, owner="EarlyStopping")
    # ValueError: EarlyStopping(patience=-1) must be an int >= 0
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_path",
    "check_process_group",
    "check_str",
    "check_timeout",
    "show",
]


def show(value: Any) -> str:
    """``repr(value)``, cut to a readable length (and safe for ints too long to print)."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"<int of {value.bit_length()} bits>"
    return text if len(text) <= 80 else text[:77] + "..."


def _where(name: str, value: Any, owner: str | None) -> str:
    return f"{owner}({name}={show(value)})" if owner else f"{name}={show(value)}"


def check_bool(name: str, value: Any, *, owner: str | None = None, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{_where(name, value, owner)} must be True or False{' or None' if optional else ''}")


def check_str(name: str, value: Any, *, owner: str | None = None, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise TypeError(f"{_where(name, value, owner)} must be a string{' or None' if optional else ''}")


def check_path(name: str, value: Any, *, owner: str | None = None, optional: bool = False) -> None:
    if not (isinstance(value, (str, os.PathLike)) or (optional and value is None)):
        raise TypeError(
            f"{_where(name, value, owner)} must be a path (str or os.PathLike){' or None' if optional else ''}"
        )


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    owner: str | None = None,
    optional: bool = False,
) -> None:
    if optional and value is None:
        return
    bounds = f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else (
        f" >= {minimum}" if minimum is not None else ""
    )  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{_where(name, value, owner)} must be an int{bounds}{' or None' if optional else ''}"
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{_where(name, value, owner)} must be an int{bounds}")


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: bool = False,
    finite: bool = True,
    owner: str | None = None,
    optional: bool = False,
) -> None:
    """An int or float, never NaN; ``finite`` also refuses infinities; ``minimum`` is inclusive
    (exclusive with ``above``)."""
    if optional and value is None:
        return
    bound = "" if minimum is None else f" {'>' if above else '>='} {minimum}"
    kind = f"a {'finite ' if finite else ''}number{bound}{' or None' if optional else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_where(name, value, owner)} must be {kind}")
    if (
        math.isnan(value)
        or (finite and math.isinf(value))
        or (minimum is not None and (value <= minimum if above else value < minimum))
    ):
        raise ValueError(f"{_where(name, value, owner)} must be {kind}")


def check_timeout(name: str, value: Any, *, owner: str | None = None) -> None:
    if not isinstance(value, timedelta):
        raise TypeError(f"{_where(name, value, owner)} must be a datetime.timedelta")
    if value <= timedelta(0):
        raise ValueError(f"{_where(name, value, owner)} must be a positive datetime.timedelta")


#: Seconds a rank may wait in one collective before the watchdog (``ember/_watchdog.py``) ends the run.
DEFAULT_COLLECTIVE_TIMEOUT = 600.0


def check_collective_timeout(value: Any) -> float | None:
    """``collective_timeout`` in seconds (``None``: no watchdog); raises ``ValueError`` otherwise."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(
            f"collective_timeout={value!r} must be a number of seconds > 0, a datetime.timedelta, "
            "or None (no watchdog)"
        )
    return float(seconds)


def check_choice(name: str, value: Any, choices: Iterable[Any], *, owner: str | None = None) -> None:
    """``value`` is one of ``choices`` (compared by type and value: ``1`` is not ``True``)."""
    options = list(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in options):
        raise ValueError(
            f"{_where(name, value, owner)} is not valid. Valid choices: {', '.join(map(repr, options))}"
        )


PROCESS_GROUP_BACKENDS = ("gloo", "nccl", "mpi", "ucc")


def check_process_group(backend: Any, timeout: Any, *, owner: str | None = None) -> None:
    """``process_group_backend`` (None: the device's default) and ``timeout`` of a parallel strategy's config."""
    if backend is not None and not (isinstance(backend, str) and backend in PROCESS_GROUP_BACKENDS):
        raise ValueError(
            f"process_group_backend={show(backend)} is not a torch.distributed backend. "
            f"Valid choices: None, {', '.join(map(repr, PROCESS_GROUP_BACKENDS))}"
        )
    check_timeout("timeout", timeout, owner=owner)
