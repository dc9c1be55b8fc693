"""Lightning's ``FSDPStrategy`` options (and torch FSDP1's, which Lightning passes through) that
``FSDPConfig`` spells otherwise or does not have: each says what to write in ember instead. Also the
check of ``FSDPConfig.device_mesh``, Lightning's ``(replicas, shards)`` tuple."""

from __future__ import annotations

from typing import Any

from ember._validation import show

__all__ = ["check_device_mesh", "refuse_foreign_options"]

_SHARDING = {
    "FULL_SHARD": "is the default (reshard_after_forward=True)",
    "SHARD_GRAD_OP": "is reshard_after_forward=False (strategy='fsdp_shard_grad_op')",
    "HYBRID_SHARD": "is hybrid=True (strategy='fsdp_hybrid'), or device_mesh=(replicas, shards)",
    "HYBRID_SHARD_ZERO2": "is hybrid=True with reshard_after_forward=False",
    "NO_SHARD": "shards nothing: that is strategy='ddp', or FSDPConfig(device_mesh=(world_size, 1))",
}
_KEEP_WEIGHTS = (
    "ember does not broadcast rank 0's weights: build the model alike on every process (seeded), or inside "
    "init_module(empty_init=True) / configure_model() and load the weights after prepare"
)
_INSTEAD = {
    "auto_wrap_policy": "is FSDPConfig(wrap=...): a set of module classes, a torch wrapping policy or a callable",
    "activation_checkpointing_policy": "is FSDPConfig(activation_checkpointing=...): a set of module classes, "
    "a torch wrapping policy or a callable",
    "cpu_offload": "is FSDPConfig(offload=True) (strategy='fsdp_offload')",
    "mixed_precision": "comes from the precision: Trainer/Accelerator(precision='bf16-mixed' or '16-mixed'), with "
    "FSDPConfig(reduce_dtype=...) for the gradient reduction dtype",
    "mixed_precision_policy": "comes from the precision: Trainer/Accelerator(precision='bf16-mixed' or "
    "'16-mixed'), with FSDPConfig(reduce_dtype=...) for the gradient reduction dtype",
    "limit_all_gathers": "FSDP2 always limits its in-flight all-gathers: leave it out",
    "use_orig_params": "FSDP2 always keeps the original parameters (use_orig_params=True): leave it out",
    "sync_module_states": _KEEP_WEIGHTS,
    "cpu_ram_efficient_loading": _KEEP_WEIGHTS,
    "param_init_fn": "build the model inside init_module(empty_init=True) (or configure_model()): each process "
    "materialises its shards with reset_parameters()",
    "min_num_params": "is FSDPConfig(min_params=...) with wrap='auto'",
    "transformer_cls_names_to_wrap": "is FSDPConfig(wrap={'ClassName', ...})",
    "device_mesh": "is FSDPConfig(device_mesh=(replicas, shards))",
    "process_group": "is chosen by FSDPConfig(hybrid=...) or FSDPConfig(device_mesh=(replicas, shards))",
    "device_id": "is the local rank's device (Trainer(devices=...))",
    "precision_plugin": "comes from Trainer/Accelerator(precision=...)",
    "fsdp_version": "ember runs FSDP2 (torch.distributed.fsdp.fully_shard): leave it out",
}
for _name in ("backward_prefetch", "forward_prefetch", "ignored_modules", "ignored_states",
              "state_dict_config", "optim_state_dict_config"):  # fmt: skip
    _INSTEAD[_name] = "is an FSDP1 option that FSDP2 has no equivalent for: leave it out"


def _sharding_name(value: Any) -> str:
    """torch's ShardingStrategy member or its name, any case -> the name."""
    name = getattr(value, "name", value)
    return name.upper().lstrip("_") if isinstance(name, str) else ""


def refuse_foreign_options(owner: str, options: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Raise a ``TypeError`` for the first of ``options`` that is not one of ``fields``, saying what
    ember calls it (``owner``: ``"FSDPConfig"`` or ``"FSDPStrategy"``, which takes the fields too).
    No error for known fields."""
    for name, value in options.items():
        if name in fields:
            continue
        if name == "sharding_strategy":
            kind = _sharding_name(value)
            why = _SHARDING.get(kind)
            if why is None:
                why = "is not a sharding strategy. " + "; ".join(f"{k} {v}" for k, v in _SHARDING.items())
            raise TypeError(
                f"{owner}(sharding_strategy=...): ember's FSDPConfig has no sharding_strategy; "
                f"sharding_strategy={value!r} {why}"
            )
        if name in _INSTEAD:
            text = _INSTEAD[name]
            joint = " " if text.startswith(("is ", "comes ")) else ": "
            raise TypeError(f"{owner}({name}=...): {name}{joint}{text}")


def check_device_mesh(mesh: Any, hybrid: bool | None) -> None:
    """``FSDPConfig(device_mesh=...)``: None or (replicas, shards), not with ``hybrid=False``."""
    if mesh is None:
        return
    if not (
        isinstance(mesh, tuple)
        and len(mesh) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in mesh)
    ):
        raise ValueError(
            f"device_mesh={show(mesh)} must be None or a tuple (replicas, shards) of two ints >= 1"
        )
    if hybrid is False:
        raise ValueError(
            f"device_mesh={mesh} is a hybrid mesh (replicas, shards), but hybrid=False; "
            "leave hybrid at None (or True) with device_mesh"
        )
