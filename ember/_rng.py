"""Seeding and per-rank RNG state (python, numpy, torch CPU and CUDA, XLA)."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

from ember.strategies.environment import default_cublas_workspace, process_rank


def seed_everything(
    seed: int, workers: bool = False, *, device_specific: bool = False, deterministic: bool = False
) -> int:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device) with ``seed``; returns it.

    ``device_specific`` adds this process's global rank (``RANK``, set by the launcher), so that each
    process draws different numbers (🤗 Accelerate's ``set_seed``); ``deterministic`` also calls
    ``torch.use_deterministic_algorithms(True)``. ``workers`` is Lightning's flag, accepted as it is:
    a prepared dataloader always derives its workers' seeds from the run's seed and the epoch.
    """
    for name, flag in (
        ("workers", workers),
        ("device_specific", device_specific),
        ("deterministic", deterministic),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r} must be True or False")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32)")
    if device_specific:
        seed = (seed + process_rank()) % 2**32
    if deterministic:
        use_deterministic_algorithms()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def use_deterministic_algorithms(warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(True)``, with the cuBLAS workspace setting it needs on
    CUDA (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, unless already set; read when cuBLAS starts)."""
    default_cublas_workspace()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)


def rng_state(xla: bool = False) -> dict[str, Any]:
    """This process's generator states; with ``xla``, also the XLA device's (its running seed)."""
    version, internal, gauss = random.getstate()
    kind, raw_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    keys = np.asarray(raw_keys)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        # uint32 keys are stored as int64: safetensors has no unsigned 32-bit type for torch.
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if xla:
        import torch_xla.core.xla_model as xm

        state["xla"] = int(xm.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "xla" in state and "torch_xla" in sys.modules:  # an XLA run's checkpoint, loaded on XLA
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(state["xla"]))
