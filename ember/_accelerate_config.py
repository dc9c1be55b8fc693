"""Read a 🤗 Accelerate config file (``accelerate config``'s ``default_config.yaml``) as ember launch options.

Its keys that have an ember equivalent are mapped (``num_processes`` over ``num_machines`` becomes
``nproc_per_node``, ``distributed_type: FSDP`` with ``fsdp_config`` a ``strategy`` name, ...); keys at
values that change nothing for a torchrun launch (``compute_environment: LOCAL_MACHINE``,
``tpu_use_sudo: false``...) are accepted; every other key is refused, all of them named in one error,
rather than silently dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from ember._launch_config import LaunchConfigError
from ember._launch_flags import SHARDING as _SHARDING
from ember._launch_flags import deepspeed_strategy, fsdp_strategy

__all__ = ["from_accelerate", "is_accelerate_config"]

# Keys ember maps; each to its ember key (the others are handled one by one below).
_RENAMED = {"num_machines": "nnodes", "machine_rank": "node_rank", "main_process_ip": "master_addr",
            "main_process_port": "master_port", "mixed_precision": "precision", "max_restarts": "max_restarts"}  # fmt: skip
# Keys accepted at these values only: they change nothing for a launch on torchrun.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "compute_environment": ("LOCAL_MACHINE",),
    "debug": (False,),
    "downcast_bf16": (False, "no"),
    "enable_cpu_affinity": (False,),
    "rdzv_backend": ("static", None),
    "gpu_ids": ("all", None),
    "tpu_use_cluster": (False,),
    "tpu_use_sudo": (False,),
    **dict.fromkeys(("tpu_name", "tpu_zone", "command_file", "commands", "tpu_vm", "tpu_env", "fp8_config",
                     "parallelism_config", "megatron_lm_config", "mpirun_config"), (None, [], {})),
    "dynamo_config": (None, {}, {"dynamo_backend": "NO"}),
}  # fmt: skip
_ANY = ("same_network", "main_training_function")  # meaningful for TPU pods / other launchers only
_DEVICE = {"NO": None, "MULTI_CPU": "cpu", "MULTI_GPU": "cuda", "XLA": "xla", "DEEPSPEED": None, "FSDP": None}
_DEEPSPEED_NEUTRAL = {"gradient_accumulation_steps": (1, None), "zero3_init_flag": (False, None),
                      "zero3_save_16bit_model": (False, None), "deepspeed_multinode_launcher": ("standard", None)}  # fmt: skip
_DEEPSPEED_MAPPED = ("zero_stage", "offload_optimizer_device", "offload_param_device")
_FSDP_MAPPED = ("fsdp_sharding_strategy", "fsdp_reshard_after_forward", "fsdp_offload_params")


def is_accelerate_config(data: Mapping[object, object]) -> bool:
    return "distributed_type" in data or "compute_environment" in data


def processes_in_all(path: str) -> int | None:
    """An Accelerate config file's ``num_processes`` (over all its machines, a count >= 1), else None:
    ``ember launch`` splits it over the node count it ends up with (``--num_machines`` may override
    the file's), as ``accelerate launch`` does."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # (read_config has reported it)
    if not isinstance(data, dict) or not is_accelerate_config(data):
        return None
    total = data.get("num_processes")
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 1 else None


def from_accelerate(data: Mapping[object, object], path: str) -> dict[str, object]:
    """ember's launch options from an Accelerate config; LaunchConfigError names every key ember cannot honour."""
    unsupported: list[str] = []
    out: dict[str, object] = {}
    section: dict[str, object] = {}

    def refuse(key: str, value: object) -> None:
        unsupported.append(f"{key}: {value!r}")

    for key, value in data.items():
        name = str(key)
        if name in _RENAMED:
            out[_RENAMED[name]] = value
        elif name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                refuse(name, value)
        elif name in ("deepspeed_config", "fsdp_config"):
            if not isinstance(value, dict):
                refuse(name, value)
                continue
            mapped = _DEEPSPEED_MAPPED if name == "deepspeed_config" else _FSDP_MAPPED
            for sub, subvalue in value.items():
                if sub in mapped:
                    section[str(sub)] = subvalue
                elif name == "fsdp_config" and sub == "fsdp_version":
                    continue  # ember's fsdp is FSDP2 either way
                elif sub not in _DEEPSPEED_NEUTRAL or subvalue not in _DEEPSPEED_NEUTRAL[str(sub)]:
                    refuse(f"{name}.{sub}", subvalue)
        elif name not in _ANY and name not in ("distributed_type", "use_cpu", "num_processes"):
            refuse(name, value)
    kind = data.get("distributed_type", "NO")
    if kind not in _DEVICE:
        refuse("distributed_type", kind)
    elif _DEVICE[str(kind)] is not None:
        out["accelerator"] = _DEVICE[str(kind)]
    if data.get("use_cpu") is True:
        if out.get("accelerator") not in (None, "cpu"):
            refuse("use_cpu", True)  # with distributed_type MULTI_GPU or XLA: which one?
        out["accelerator"] = "cpu"
    elif data.get("use_cpu") not in (None, False):
        refuse("use_cpu", data.get("use_cpu"))
    if not unsupported and kind in ("DEEPSPEED", "FSDP"):

        def error(message: str) -> None:
            raise LaunchConfigError(f"config file {path!r} (🤗 Accelerate's format): {message}")

        flags = argparse.Namespace(**dict.fromkeys((*_DEEPSPEED_MAPPED, *_FSDP_MAPPED)))
        for sub, subvalue in section.items():
            text = str(subvalue).lower()
            if sub == "zero_stage" and text not in ("1", "2", "3"):
                refuse("deepspeed_config.zero_stage", subvalue)
            elif sub.startswith("offload") and text not in ("none", "cpu"):
                refuse(f"deepspeed_config.{sub}", subvalue)
            elif sub == "fsdp_sharding_strategy" and text not in _SHARDING:
                refuse(f"fsdp_config.{sub}", subvalue)
            elif sub in ("fsdp_reshard_after_forward", "fsdp_offload_params") and text not in (
                "true",
                "false",
            ):
                refuse(f"fsdp_config.{sub}", subvalue)
            setattr(flags, sub, text)
        if not unsupported:
            out["strategy"] = (
                deepspeed_strategy(flags, error) if kind == "DEEPSPEED" else fsdp_strategy(flags, error)
            )
    if unsupported:
        raise LaunchConfigError(
            f"config file {path!r} is a 🤗 Accelerate config with settings ember launch does not take: "
            + ", ".join(unsupported)
            + ". Remove them, and set what they did in the script (Accelerator or Trainer arguments, "
            "DeepSpeedConfig, FSDPConfig) or with ember launch's options (see ember launch --help)"
        )
    total = data.get("num_processes")
    if total is not None and total != -1:  # -1: not set
        nnodes = out.get("nnodes", 1)
        if isinstance(total, int) and isinstance(nnodes, int) and not isinstance(total, bool) and nnodes >= 1:
            if total % nnodes:
                raise LaunchConfigError(
                    f"config file {path!r}: num_processes {total} does not divide evenly over num_machines {nnodes}"
                )
            out["nproc_per_node"] = total // nnodes
        else:
            out["nproc_per_node"] = total  # checked, with its error, as nproc_per_node
    return out
