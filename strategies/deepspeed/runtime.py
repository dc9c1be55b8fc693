"""What ``deepspeed.initialize`` does not set up from the configuration: DeepSpeed's logger,
its activation checkpointing, and (on a CPU run) the comm op build it can skip."""

from __future__ import annotations

from typing import Any


def configure_logging_and_ops(*, logging_level: int, on_cpu: bool) -> None:
    """Before ``deepspeed.initialize``: DeepSpeed's logger level (as Lightning sets it) and, on the CPU,
    no comm op build."""
    import deepspeed

    deepspeed.utils.logging.logger.setLevel(logging_level)
    if on_cpu:
        _skip_shm_comm_build()


def configure_checkpointing(config: dict[str, Any]) -> None:
    """After ``deepspeed.initialize`` (it needs DeepSpeed's comm layer): the ``activation_checkpointing``
    block, as Lightning applies it."""
    import deepspeed

    checkpointing = config.get("activation_checkpointing")
    if (
        checkpointing
    ):  # the engine does not read this block: deepspeed.checkpointing.checkpoint does, once configured
        deepspeed.checkpointing.configure(
            mpu_=None,
            partition_activations=checkpointing.get("partition_activations"),
            contiguous_checkpointing=checkpointing.get("contiguous_memory_optimization"),
            num_checkpoints=checkpointing.get("number_checkpoints"),
            checkpoint_in_cpu=checkpointing.get("cpu_checkpointing"),
            synchronize=checkpointing.get("synchronize_checkpoint_boundary"),
            profile=checkpointing.get("profile"),
        )


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on a CPU run.

    On CPU, DeepSpeed's comm layer builds a C++ op (about a minute of gcc on first use) that only
    its inference all-reduce uses; training collectives go through the gloo process group either
    way. DeepSpeed probes op compatibility once into ``deepspeed.ops.__compatible_ops__`` and keeps
    edits to that dict, so marking the op unavailable there skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
