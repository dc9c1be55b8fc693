"""Autouse fixtures: every test starts and ends with the same environment and no process group."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from dist_helpers import RANK_VARIABLES

# The XLA suite needs torch_xla, which needs its own torch build: it runs in .venv-xla
# (`make test-xla`, part of `make test`), and is not collected where torch_xla is missing.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_process_group() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_wandb_run() -> Iterator[None]:
    """A WandbLogger keeps its run open after a successful stage (as Lightning's): finish it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@pytest.fixture(autouse=True)
def _restore_rng_and_dtype() -> Iterator[None]:
    state, dtype = torch.get_rng_state(), torch.get_default_dtype()
    yield
    torch.set_rng_state(state)
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests in this process are rank 0 of 1 unless they set the variables themselves."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name, raising=False)
