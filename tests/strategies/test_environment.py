"""Process environment detection (plain, torchrun, SLURM) and the strategy registry."""

from __future__ import annotations

import pytest

from ember.strategies import (
    STRATEGY_REGISTRY,
    DDPConfig,
    DDPStrategy,
    SingleDeviceStrategy,
    detect_environment,
)
from ember.strategies.base import resolve_strategy
from ember.strategies.environment import _first_slurm_host, launch_defaults


def test_plain_process() -> None:
    env = detect_environment({})
    assert (env.source, env.rank, env.world_size, env.launched_externally) == ("single", 0, 1, False)


def test_torchrun_variables() -> None:
    env = detect_environment(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (3, 1, 4, 2, 1)
    assert (env.master_addr, env.master_port, env.launched_externally) == ("10.0.0.1", 29500, True)
    assert env.to_env()["RANK"] == "3"
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        detect_environment({"RANK": "0", "WORLD_SIZE": "two"})


def test_slurm_variables() -> None:
    env = detect_environment(
        {
            "SLURM_NTASKS": "8",
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "gpu[003-004]",
            "SLURM_JOB_ID": "1234",
            "SLURM_JOB_NAME": "train",
        }
    )
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size) == (
        "slurm",
        5,
        1,
        8,
        4,
    )
    assert env.master_addr == "gpu003" and env.master_port == 15000 + 1234
    interactive = detect_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash"})
    assert interactive.source == "single"
    assert _first_slurm_host("node7,node8") == "node7" and _first_slurm_host("a[1,5-6]") == "a1"


def test_launch_defaults() -> None:
    assert launch_defaults({"EMBER_STRATEGY": "ddp", "EMBER_PRECISION": "bf16-mixed"}) == {
        "strategy": "ddp",
        "precision": "bf16-mixed",
    }


def test_registry_and_auto() -> None:
    assert {"ddp", "single_device", "ddp_find_unused_parameters_true"} <= set(STRATEGY_REGISTRY.names())
    assert isinstance(resolve_strategy("auto", world_size=1), SingleDeviceStrategy)
    assert isinstance(resolve_strategy("auto", world_size=2), DDPStrategy)
    preset = resolve_strategy("ddp_find_unused_parameters_true", world_size=2)
    assert isinstance(preset, DDPStrategy) and preset.config.find_unused_parameters
    with pytest.raises(
        ValueError, match=r"strategy='fsdq' is not a known strategy\. Valid choices: 'auto', 'ddp'"
    ):
        resolve_strategy("fsdq", world_size=1)
    with pytest.raises(TypeError, match="strategy=3"):
        resolve_strategy(3, world_size=1)  # type: ignore[arg-type]


def test_ddp_config_validation() -> None:
    with pytest.raises(ValueError, match=r"process_group_backend='tcp' is not a torch.distributed backend"):
        DDPConfig(process_group_backend="tcp")
    with pytest.raises(ValueError, match="bucket_cap_mb=0"):
        DDPConfig(bucket_cap_mb=0)
    with pytest.raises(TypeError):
        DDPConfig(True)  # type: ignore[misc]  # keyword-only
