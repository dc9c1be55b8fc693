"""``notebook_launcher``: run a training function on several processes from a notebook (🤗 Accelerate's).

A notebook cannot be re-run as a script for the other ranks (what ``Accelerator(devices=N)`` does
under plain ``python``), so the function itself is run in forked processes, each with the
torchrun-style variables of its rank; an :class:`~ember.Accelerator` (or ``Trainer``) created inside
joins them as it would under ``ember launch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.multiprocessing.spawn import start_processes

from ember._validation import check_int, check_str
from ember.strategies.environment import ProcessEnvironment, scoped_variables

__all__ = ["notebook_launcher"]

# Accelerate's mixed_precision names, passed to every Accelerator of the run as ``ember launch
# --precision`` would (an Accelerator's own precision= still wins).
_PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def notebook_launcher(
    function: Callable[..., Any],
    args: Sequence[Any] = (),
    num_processes: int | None = None,
    mixed_precision: str = "no",
    use_port: str | int = "29500",
    master_addr: str = "127.0.0.1",
    node_rank: int = 0,
    num_nodes: int = 1,
) -> None:
    """Run ``function(*args)`` on ``num_processes`` processes of this machine (times ``num_nodes``).

    ``num_processes=None``: one per CUDA device, else 1. With one process in all, ``function`` runs
    here, in this process. Otherwise each process is forked from this one (functions and data
    defined in the notebook need no pickling) with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` ... set;
    the call returns when every process has finished, and raises if one of them failed (its
    traceback in the message). CUDA must not be initialised in this process before (a forked
    process cannot use it): create models on the GPU inside ``function``. ``mixed_precision``
    (``"no"``, ``"fp16"``, ``"bf16"``) is the default precision of the Accelerators created inside.
    Several machines: run the same cell on each, with ``num_nodes``, its ``node_rank`` and node 0's
    ``master_addr`` and ``use_port``.

    Example::

        def train(lr):
            accelerator = Accelerator()
            ...

        notebook_launcher(train, args=(1e-3,), num_processes=2)
    """
    if not callable(function):
        raise TypeError(f"notebook_launcher(function={function!r}) must be callable")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"notebook_launcher(args={args!r}) must be a tuple or list of arguments")
    owner = "notebook_launcher"
    if num_processes is None:
        num_processes = torch.cuda.device_count() if torch.cuda.is_available() else 1
    check_int("num_processes", num_processes, minimum=1, owner=owner)
    check_int("num_nodes", num_nodes, minimum=1, owner=owner)
    check_int("node_rank", node_rank, minimum=0, maximum=num_nodes - 1, owner=owner)
    check_str("master_addr", master_addr, owner=owner)
    if mixed_precision not in _PRECISION:
        raise ValueError(
            f"notebook_launcher(mixed_precision={mixed_precision!r}) is not valid. Valid choices: 'no', 'fp16', 'bf16'"
        )
    try:
        port = int(use_port)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"notebook_launcher(use_port={use_port!r}) must be a port number in [1, 65535]")
    world_size = num_processes * num_nodes
    precision = {"EMBER_PRECISION": _PRECISION[mixed_precision]}
    if world_size == 1:
        with scoped_variables(precision):
            function(*args)
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "notebook_launcher: CUDA was initialised in this process before the launch, and forked "
            "processes cannot use it. Restart the kernel and create models on the GPU inside the "
            "launched function only"
        )
    envs = [
        {
            **ProcessEnvironment(
                source="torchelastic",
                rank=node_rank * num_processes + local,
                local_rank=local,
                world_size=world_size,
                local_world_size=num_processes,
                node_rank=node_rank,
                master_addr=master_addr,
                master_port=port,
            ).to_env(),
            **precision,
        }
        for local in range(num_processes)
    ]
    start_processes(_run, args=(function, tuple(args), envs), nprocs=num_processes, start_method="fork")


def _run(
    local_rank: int, function: Callable[..., Any], args: tuple[Any, ...], envs: list[dict[str, str]]
) -> None:
    os.environ.update(envs[local_rank])
    function(*args)
