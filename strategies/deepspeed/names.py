"""Lightning's ``DeepSpeedStrategy`` options that ``DeepSpeedConfig`` does not have: each says what to
write in ember instead (a plain "unexpected keyword argument" would not)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ember.strategies.options import config_of

if TYPE_CHECKING:
    from ember.strategies.deepspeed.config import DeepSpeedConfig

__all__ = ["LIGHTNING_REFUSED", "refuse_lightning_options", "strategy_config"]

_NVME = (
    "ember's typed options offload to the CPU only (offload_optimizer=True, offload_parameters=True); for NVMe "
    'offload give the zero_optimization.offload_optimizer / offload_param blocks ({"device": "nvme", '
    '"nvme_path": ..., "buffer_count": ...}) and the "aio" block in config='
)
_FROM_THE_RUN = "comes from the Trainer/Accelerator arguments (devices=, precision=, plugins=): leave it out"

LIGHTNING_REFUSED: dict[str, str] = {
    "offload_optimizer_device": _NVME,
    "offload_params_device": _NVME,
    "zero_optimization": "zero_optimization=False is stage=0 (DeepSpeed's engine without ZeRO)",
    "remote_device": "ember does not build models under deepspeed.zero.Init: leave it out",
    "zero_allow_untested_optimizer": "ember sets it (true) whenever a torch optimizer is prepared: leave it out",
    "logging_batch_size_per_gpu": "train_micro_batch_size_per_gpu is the first prepared dataloader's batch_size",
    "contiguous_memory_optimization": "needs the number of checkpoints too: give an activation_checkpointing block "
    'with "partition_activations": true, "contiguous_memory_optimization": true and "number_checkpoints" in config=',
    "load_full_weights": "ember resumes DeepSpeed runs from the engine's own checkpoints; to start from full "
    "weights, load them into the module before prepare(), or after it with "
    "strategy.load_module_state_dict(model, state), which re-partitions them under stage 3",
    "accelerator": _FROM_THE_RUN,
    "parallel_devices": _FROM_THE_RUN,
    "cluster_environment": _FROM_THE_RUN,
    "precision_plugin": _FROM_THE_RUN,
}
for _name in ("nvme_path", "params_buffer_count", "params_buffer_size", "max_in_cpu", "optimizer_buffer_count",
              "block_size", "queue_depth", "single_submit", "overlap_events", "thread_count"):  # fmt: skip
    LIGHTNING_REFUSED[_name] = _NVME


def refuse_lightning_options(owner: str, options: dict[str, Any]) -> None:
    """Raise ``TypeError`` for the first of ``options`` that is one of Lightning's that ember spells otherwise."""
    for name in options:
        if name in LIGHTNING_REFUSED:
            raise TypeError(f"{owner}({name}=...): {LIGHTNING_REFUSED[name]}")


def strategy_config(config: Any, options: dict[str, Any]) -> DeepSpeedConfig:
    """``DeepSpeedStrategy(config, **options)``'s config: a ``DeepSpeedConfig``, or one made of
    ``DeepSpeedConfig``'s fields as keywords, or (Lightning's form) of a DeepSpeed config dict or path;
    without a DeepSpeed config, the file ``PL_DEEPSPEED_CONFIG_PATH`` names, if set (as Lightning)."""
    from ember.strategies.deepspeed.config import DeepSpeedConfig, _with_config_variable

    if isinstance(config, (dict, str, os.PathLike)):
        config, options = None, {"config": config, **options}
    made: DeepSpeedConfig = config_of(
        "DeepSpeedStrategy", DeepSpeedConfig, config, options, refused=LIGHTNING_REFUSED
    )
    return _with_config_variable(made)  # Lightning's PL_DEEPSPEED_CONFIG_PATH, where no config was given
